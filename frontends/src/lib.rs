//! Model frontends: they read a model as users have it and build a smelt IR
//! graph from primitive ops.
//!
//! - [`hf`]: Hugging Face checkpoint folders (`config.json` + safetensors).
//! - [`onnx`]: ONNX files (protobuf, initialisers, external data).

pub mod hf;
pub mod onnx;
