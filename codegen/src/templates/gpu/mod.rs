//! GPU kernel templates: KIR kernels with a launch shape (`Kernel::gpu`),
//! thread and block indices, barriers, warp shuffles and shared memory,
//! tested in the KIR interpreter's GPU mode.

pub mod attention;
pub mod concat;
pub mod gpuize;
pub mod norm;
pub mod rope;
pub mod rows;
pub mod softmax;
#[cfg(test)]
pub(crate) mod testing;
