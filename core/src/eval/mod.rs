//! Evaluation. Zero-shot classification follows OpenCLIP
//! `zero_shot_classifier.py`: each class embedding is the normalised mean of
//! its normalised prompt embeddings (prompt ensembling), and an image is
//! assigned the class of highest cosine similarity. Evaluation never
//! reduces tokens.

pub mod zeroshot;

pub use zeroshot::{ZeroShotResult, ZeroShotTask};
