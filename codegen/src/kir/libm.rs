//! The C math library functions that KIR ops without a machine instruction
//! call: `sinf`, `cosf`, `logf`, `erff`, `powf`, `fmodf`.
//!
//! The Cranelift lowering calls them by symbol (imported functions, resolved
//! by the JIT from [`symbols`] and by the linker for the artifact's shared
//! library, which is linked with `-lm`), and the KIR interpreter calls the
//! very same functions through the safe wrappers here, so the two agree bit
//! for bit.

use std::ffi::c_float;

#[link(name = "m")]
extern "C" {
    #[link_name = "sinf"]
    fn c_sinf(x: c_float) -> c_float;
    #[link_name = "cosf"]
    fn c_cosf(x: c_float) -> c_float;
    #[link_name = "logf"]
    fn c_logf(x: c_float) -> c_float;
    #[link_name = "erff"]
    fn c_erff(x: c_float) -> c_float;
    #[link_name = "powf"]
    fn c_powf(x: c_float, y: c_float) -> c_float;
    #[link_name = "fmodf"]
    fn c_fmodf(x: c_float, y: c_float) -> c_float;
}

// SAFETY (all wrappers): these libm functions are pure, thread-safe and
// defined for every f32 input (NaN and infinities included).
pub fn sinf(x: f32) -> f32 {
    unsafe { c_sinf(x) }
}

pub fn cosf(x: f32) -> f32 {
    unsafe { c_cosf(x) }
}

pub fn logf(x: f32) -> f32 {
    unsafe { c_logf(x) }
}

pub fn erff(x: f32) -> f32 {
    unsafe { c_erff(x) }
}

pub fn powf(x: f32, y: f32) -> f32 {
    unsafe { c_powf(x, y) }
}

pub fn fmodf(x: f32, y: f32) -> f32 {
    unsafe { c_fmodf(x, y) }
}

/// Symbol name, address and arity (1 or 2 f32 arguments, one f32 result)
/// of every function above, for the JIT's symbol table.
pub fn symbols() -> [(&'static str, *const u8, usize); 6] {
    [
        ("sinf", c_sinf as *const u8, 1),
        ("cosf", c_cosf as *const u8, 1),
        ("logf", c_logf as *const u8, 1),
        ("erff", c_erff as *const u8, 1),
        ("powf", c_powf as *const u8, 2),
        ("fmodf", c_fmodf as *const u8, 2),
    ]
}
