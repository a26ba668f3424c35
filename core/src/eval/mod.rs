//! Evaluation. Zero-shot classification follows OpenCLIP
//! `zero_shot_classifier.py`: each class embedding is the normalised mean of
//! its normalised prompt embeddings (prompt ensembling), and an image is
//! assigned the class of highest cosine similarity. Retrieval ranks every
//! caption against every image, in chunks. Evaluation never reduces tokens.
//! Both read clip_benchmark's WebDataset layout too, and report in its
//! result layout ([`benchmark`]).

pub mod benchmark;
pub mod evaluator;
pub mod retrieval;
pub mod zeroshot;
pub mod zeroshot_data;

pub use crate::model::EvalResize;
pub use benchmark::{BenchmarkRecord, BenchmarkTask};
pub use evaluator::{EvalResult, EvaluatorConfig, RetrievalEval, ZeroShotEval};
pub use retrieval::{RecallAtK, RetrievalResult};
pub use zeroshot::{TemplateSet, ZeroShotResult, ZeroShotTask};
pub use zeroshot_data::ZeroShotData;

/// Where a zero-shot evaluation reads from: the flag group that `clipa
/// train` and `clipa eval` share (with the `cli` feature).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ZeroShotFlags {
    /// Image folder (`root/<class>/*`) for zero-shot classification, or a
    /// dataset in clip_benchmark's WebDataset layout (a root with
    /// `classnames.txt` and `test/*.tar`, a split folder, or shards).
    #[cfg_attr(feature = "cli", arg(long))]
    pub zeroshot_data: Option<std::path::PathBuf>,
    /// Class names, one per line in label order (default: a clip_benchmark
    /// dataset's `classnames.txt`; for a folder, the bundled ImageNet names
    /// for 1,000 classes, else the folder names). A file listing exactly
    /// the folder names in another order maps labels by name.
    #[cfg_attr(feature = "cli", arg(long))]
    pub classnames: Option<std::path::PathBuf>,
    /// Prompt templates: photo | simple | openai | FILE (one per line, `{}`
    /// or `{c}` for the class). Default: a clip_benchmark dataset's own,
    /// openai for ImageNet, else photo.
    #[cfg_attr(feature = "cli", arg(long))]
    pub templates: Option<TemplateSet>,
}
