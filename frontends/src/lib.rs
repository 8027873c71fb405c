//! Model frontends: Hugging Face checkpoints and (later) ONNX.
