//! smelt-runtime: loads smelt artifacts and runs them.
//!
//! - [`artifact`]: the artifact format (a `NAME.smelt/` directory with a
//!   manifest, the verified text IR, the weights and the tokenizer), its
//!   writer and its checked reader.
//! - [`tensors`]: named tensors in safetensors files (artifact weights, and
//!   the inputs and outputs of `smelt run`).
//! - [`model`]: [`model::InterpModel`], a model run by the reference
//!   interpreter, which fills the optional decoder inputs with their defaults.
//! - [`generate`](mod@generate): the [`generate::Forward`] trait and greedy generation with
//!   the KV cache on top of it.
//! - [`plan`]: the launch plan of a natively compiled (`cpu`) artifact;
//!   [`native`]: [`native::NativeModel`], which runs it (the kernel library
//!   loaded with `dlopen`, a persistent thread team, a liveness-planned
//!   arena, the KV cache kept in its own memory while decoding); [`cache`]:
//!   the host half of a KV cache a model keeps itself, shared by both
//!   runtimes; [`cuda`]: [`cuda::CudaModel`], which runs a `cuda` plan's PTX
//!   kernels on an NVIDIA GPU (the driver loaded at run time), with the KV
//!   cache kept on the device while decoding.
//!
//! The runtime links no compiler (no egg, Cranelift or LLVM): an artifact is
//! everything it needs. It depends on smelt-ir only for tensors, the text IR
//! parser, the verifier and the reference interpreter.

pub mod artifact;
pub mod cache;
pub mod constants;
pub mod cuda;
pub mod generate;
pub mod model;
pub mod native;
pub mod plan;
pub mod tensors;

pub use artifact::{Artifact, ArtifactError, Manifest, ModelInfo, Signature, TensorSig};
pub use generate::{
    generate, CachedDecode, Forward, ForwardError, GenerateError, GenerateOptions, Generation, Sampling, StopReason,
};
pub use model::InterpModel;
pub use tensors::{read_tensor_file, write_tensor_file, TensorFileError};
