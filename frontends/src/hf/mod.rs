//! Hugging Face checkpoints: a folder with `config.json` and safetensors
//! weights (one file, or shards listed in `model.safetensors.index.json`).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod writer;

pub use checkpoint::{Checkpoint, TensorRef};
pub use config::HfConfig;
pub use error::HfError;
