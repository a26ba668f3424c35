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
