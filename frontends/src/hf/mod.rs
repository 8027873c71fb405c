//! Hugging Face checkpoints: a folder with `config.json` and safetensors
//! weights (one file, or shards listed in `model.safetensors.index.json`).

pub mod build;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod writer;

pub use build::{build, build_stored, build_stored_with, load, load_stored, load_stored_with, HfModel, HfOptions};
pub use checkpoint::{Checkpoint, TensorRef};
pub use config::{supported_model_types, Activation, Arch, HfConfig, LayerAttention, RopeScaling};
pub use error::HfError;
pub use writer::{expected_tensors, write_random_checkpoint, RandomModelSpec, TensorRole, TensorSpec};
