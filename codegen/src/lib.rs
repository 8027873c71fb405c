//! Code generation from the fused IR to kernels (lands with the CPU backend).
