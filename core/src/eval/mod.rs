//! Evaluation. Zero-shot classification follows OpenCLIP
//! `zero_shot_classifier.py`: each class embedding is the normalised mean of
//! its normalised prompt embeddings (prompt ensembling), and an image is
//! assigned the class of highest cosine similarity. Retrieval ranks every
//! caption against every image, in chunks. Evaluation never reduces tokens.

pub mod evaluator;
pub mod retrieval;
pub mod zeroshot;

pub use crate::model::EvalResize;
pub use evaluator::{EvalResult, EvaluatorConfig, RetrievalEval, ZeroShotEval};
pub use retrieval::{RecallAtK, RetrievalResult};
pub use zeroshot::{TemplateSet, ZeroShotResult, ZeroShotTask};

/// Where a zero-shot evaluation reads from: the flag group that `clipa
/// train` and `clipa eval` share (with the `cli` feature).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ZeroShotFlags {
    /// Image folder (`root/<class>/*`) for zero-shot classification.
    #[cfg_attr(feature = "cli", arg(long))]
    pub zeroshot_data: Option<std::path::PathBuf>,
    /// Class names, one per line in folder order (default: the bundled
    /// ImageNet names for a 1,000-class folder, else the folder names).
    #[cfg_attr(feature = "cli", arg(long))]
    pub classnames: Option<std::path::PathBuf>,
    /// Prompt templates: photo | simple | openai | FILE (one per line, `{}`
    /// for the class). Default: openai for ImageNet, else photo.
    #[cfg_attr(feature = "cli", arg(long))]
    pub templates: Option<TemplateSet>,
}
