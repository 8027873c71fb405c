//! Debugging aids for GPU plans, chosen by environment variables and slow
//! by design (the stream is synchronised after every launch and buffers
//! are copied back to the host):
//!
//! - `SMELT_CHECK_NAN`: after each launch its float arguments (inputs and
//!   results) are read back; the first launch after which a buffer holds a
//!   NaN or a value beyond ±1e30 is printed to stderr with its kernel and
//!   node, once per buffer. The first such line names the kernel that
//!   produced it, or that read a buffer whose bytes were not what its type
//!   says.
//! - `SMELT_DUMP=DIR`: the same arguments written to `DIR` after each
//!   launch, widened to f32, as `l<launch>_a<argument>.f32` (little
//!   endian): two plans of one graph (f32 and bf16 activations, say) are
//!   then compared launch by launch.
//! - `SMELT_WATCH=NAME`: one buffer (by plan name, `%11`), summarised
//!   after every launch (its address, nonzero count, sum, first values):
//!   which launch changed it.
//!
//! Graph replay is off while any is set (every launch is issued alone).

use std::collections::BTreeSet;
use std::path::PathBuf;

use cudarc::driver::CudaStream;

use super::host::Host;
use crate::native::checked::CheckedPlan;
use crate::plan::Elem;

/// One float argument of a launch: (argument index, buffer name, element
/// type, device address, length in elements).
type Arg = (usize, String, Elem, u64, usize);

/// What the environment asked for, and what it found so far.
#[derive(Debug, Default)]
pub struct LaunchDebug {
    check: bool,
    dump: Option<PathBuf>,
    watch: Option<String>,
    /// The buffers already reported.
    reported: BTreeSet<String>,
    /// Per launch of the call being issued: its float arguments.
    args: Vec<Vec<Arg>>,
    /// Findings of the call being issued: (launch, argument, NaN count,
    /// count beyond ±1e30, first index).
    found: Vec<(usize, usize, usize, usize, usize)>,
}

impl LaunchDebug {
    /// The debugging the environment asks for, if any.
    pub fn from_env() -> Option<LaunchDebug> {
        let check = std::env::var_os("SMELT_CHECK_NAN").is_some();
        let dump = std::env::var_os("SMELT_DUMP").map(PathBuf::from);
        let watch = std::env::var("SMELT_WATCH").ok();
        (check || dump.is_some() || watch.is_some()).then(|| LaunchDebug { check, dump, watch, ..Default::default() })
    }

    /// Reads the prepared call's launch arguments (before it is issued).
    pub fn begin(&mut self, host: &Host) {
        self.args = (0..host.grids().len())
            .map(|li| host.float_args(li).into_iter().map(|(j, n, e, a, l)| (j, n.to_string(), e, a, l)).collect())
            .collect();
    }

    /// After launch `li` was issued on `stream`: waits for it and checks,
    /// dumps and watches what was asked.
    pub fn after(&mut self, li: usize, stream: &CudaStream) -> Result<(), String> {
        stream.synchronize().map_err(|e| format!("waiting for the launch: {e}"))?;
        if let Some(w) = &self.watch {
            if let Some((_, name, elem, addr, len)) = self.args.iter().flatten().find(|a| &a.1 == w) {
                let v = read(*elem, *addr, *len)?;
                let nonzero = v.iter().filter(|x| **x != 0.0).count();
                let sum: f64 = v.iter().map(|x| *x as f64).sum();
                eprintln!(
                    "SMELT_WATCH `{name}` at {addr:#x} after launch {li}: {nonzero} of {len} nonzero, sum {sum:.6e}, \
                     first {:?}",
                    &v[..v.len().min(4)]
                );
            }
        }
        if !self.check && self.dump.is_none() {
            return Ok(());
        }
        for (j, _, elem, addr, len) in self.args.get(li).into_iter().flatten() {
            let v = read(*elem, *addr, *len)?;
            if let (true, Some((nan, huge, first))) = (self.check, bad_values(&v)) {
                self.found.push((li, *j, nan, huge, first));
            }
            if let Some(dir) = &self.dump {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let file = dir.join(format!("l{li:04}_a{j}.f32"));
                std::fs::write(&file, bytes).map_err(|e| format!("writing {}: {e}", file.display()))?;
            }
        }
        Ok(())
    }

    /// Prints the call's findings, once per buffer.
    pub fn report(&mut self, c: &CheckedPlan) {
        for &(li, j, nan, huge, first) in &self.found {
            let Some((_, name, elem, _, len)) = self.args[li].iter().find(|a| a.0 == j) else { continue };
            if self.reported.insert(name.clone()) {
                eprintln!(
                    "SMELT_CHECK_NAN: after launch {li} (kernel `{}`, node `{}`): argument {j} `{name}` ({elem:?}, \
                     {len} elements) holds {nan} NaN and {huge} values beyond ±1e30, the first at element {first}",
                    c.symbol_of(li),
                    c.plan.launches[li].node
                );
            }
        }
        self.found.clear();
    }
}

/// `len` elements of `elem` at device address `addr`, widened to f32 (the
/// stream is idle).
fn read(elem: Elem, addr: u64, len: usize) -> Result<Vec<f32>, String> {
    let mut bytes = vec![0u8; len * elem.size()];
    if !bytes.is_empty() {
        // SAFETY: `addr` holds `len` elements of `elem` (the buffer's
        // address and length for this call, checked by `prepare`), `bytes`
        // has room for them, and no launch is running.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes, addr) }
            .map_err(|e| format!("reading a buffer back: {e}"))?;
    }
    Ok(widen(elem, &bytes))
}

/// Little-endian elements of `elem` as f32 (none for non-float types).
fn widen(elem: Elem, bytes: &[u8]) -> Vec<f32> {
    let halves = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    match elem {
        Elem::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Elem::BF16 => halves().map(|h| half::bf16::from_bits(h).to_f32()).collect(),
        Elem::F16 => halves().map(|h| half::f16::from_bits(h).to_f32()).collect(),
        _ => Vec::new(),
    }
}

/// Values no activation should hold: (NaN count, count infinite or beyond
/// ±1e30, the first one's index), or None when there are none.
fn bad_values(v: &[f32]) -> Option<(usize, usize, usize)> {
    let first = v.iter().position(|x| x.is_nan() || x.abs() > 1e30)?;
    Some((v.iter().filter(|x| x.is_nan()).count(), v.iter().filter(|x| x.abs() > 1e30).count(), first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_values_widen_exactly() {
        let bf16: Vec<u8> = [0x3f80u16, 0xc040, 0x7fc0].iter().flat_map(|h| h.to_le_bytes()).collect();
        let w = widen(Elem::BF16, &bf16);
        assert_eq!(&w[..2], &[1.0, -3.0]);
        assert!(w[2].is_nan());
        let f16: Vec<u8> = [0x3c00u16, 0x7c00].iter().flat_map(|h| h.to_le_bytes()).collect();
        assert_eq!(widen(Elem::F16, &f16), vec![1.0, f32::INFINITY]);
        assert_eq!(widen(Elem::F32, &2.5f32.to_le_bytes()), vec![2.5]);
        assert!(widen(Elem::I64, &[0; 8]).is_empty());
    }

    #[test]
    fn bad_values_count_nan_and_huge_from_the_first() {
        assert_eq!(bad_values(&[1.0, -1e29, 0.0]), None);
        assert_eq!(bad_values(&[1.0, f32::NAN, -2e30, f32::INFINITY, f32::NAN]), Some((2, 2, 1)));
        // A mask's f32::MIN counts as huge: the report names it, once.
        assert_eq!(bad_values(&[f32::MIN]), Some((0, 1, 0)));
    }
}
