//! Scratch memory of a native model: [`AlignedBuf`], a zeroed 64-byte
//! aligned allocation, and [`place`], which gives every scratch buffer an
//! offset so that buffers alive at the same time never overlap.
//!
//! A buffer's lifetime is the inclusive range of launch indices that use it
//! (inputs start before launch 0, outputs live past the last launch); two
//! buffers whose ranges share a launch must not overlap in memory, since
//! that launch may read one while writing the other. Placement is greedy:
//! largest buffer first, each at the lowest 64-byte aligned offset free of
//! every already placed buffer whose lifetime intersects its own.

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Alignment of every buffer in the arena (a cache line; enough for any
/// vector load the kernels make).
pub const ALIGN: usize = 64;

/// A zero-initialised, [`ALIGN`]-aligned byte buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// `len` zero bytes (at least one cache line is allocated, so the
    /// pointer is always valid and aligned); None when allocation fails.
    pub fn zeroed(len: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(AlignedBuf { ptr, len })
    }

    /// A copy of `bytes` in aligned memory.
    pub fn copy_of(bytes: &[u8]) -> Option<AlignedBuf> {
        let b = AlignedBuf::zeroed(bytes.len())?;
        // SAFETY: `b` has room for `bytes.len()` bytes and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        Some(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len.max(ALIGN), ALIGN)) };
    }
}

/// One buffer to place: its size in bytes and its inclusive lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub bytes: usize,
    pub first: usize,
    pub last: usize,
}

impl Interval {
    fn overlaps(&self, o: &Interval) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

fn align_up(x: usize) -> Option<usize> {
    x.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

/// Offsets for `items` (same order) and the arena size they need, or None
/// when the sizes overflow `usize`.
pub fn place(items: &[Interval]) -> Option<(Vec<usize>, usize)> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(items[i].bytes), i));
    let mut offsets = vec![0usize; items.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(items.len());
    let mut busy: Vec<(usize, usize)> = Vec::new();
    let mut total = 0usize;
    for i in order {
        let it = items[i];
        let size = align_up(it.bytes)?;
        busy.clear();
        busy.extend(
            placed
                .iter()
                .filter(|&&j| items[j].overlaps(&it))
                .map(|&j| (offsets[j], align_up(items[j].bytes).unwrap_or(usize::MAX))),
        );
        busy.sort_unstable();
        let mut at = 0usize;
        for &(off, len) in &busy {
            if off >= at && off - at >= size {
                break;
            }
            at = at.max(off.checked_add(len)?);
        }
        offsets[i] = at;
        total = total.max(at.checked_add(size)?);
        placed.push(i);
    }
    Some((offsets, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(bytes: usize, first: usize, last: usize) -> Interval {
        Interval { bytes, first, last }
    }

    /// Checks the placement's one invariant and that it is aligned.
    fn valid(items: &[Interval], offsets: &[usize], total: usize) {
        for (i, a) in items.iter().enumerate() {
            assert_eq!(offsets[i] % ALIGN, 0);
            assert!(offsets[i] + a.bytes <= total);
            for (j, b) in items.iter().enumerate().skip(i + 1) {
                if a.overlaps(b) && a.bytes > 0 && b.bytes > 0 {
                    let disjoint = offsets[i] + a.bytes <= offsets[j] || offsets[j] + b.bytes <= offsets[i];
                    assert!(disjoint, "{i} and {j} overlap: {items:?} {offsets:?}");
                }
            }
        }
    }

    #[test]
    fn buffers_with_disjoint_lifetimes_share_memory() {
        let items = [iv(1000, 0, 1), iv(1000, 2, 3), iv(10, 1, 2)];
        let (off, total) = place(&items).unwrap();
        valid(&items, &off, total);
        assert_eq!(off[0], off[1]);
        assert_eq!(total, 1024 + 64);
    }

    #[test]
    fn random_placements_are_valid() {
        let mut s = 12345u64;
        let mut next = |m: u64| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) % m
        };
        for _ in 0..200 {
            let n = next(20) as usize + 1;
            let items: Vec<Interval> = (0..n)
                .map(|_| {
                    let a = next(10) as usize;
                    let b = next(10) as usize;
                    iv(next(500) as usize, a.min(b), a.max(b))
                })
                .collect();
            let (off, total) = place(&items).unwrap();
            valid(&items, &off, total);
        }
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zero() {
        for n in [0, 1, 63, 64, 1000] {
            let b = AlignedBuf::zeroed(n).unwrap();
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            let s = unsafe { std::slice::from_raw_parts(b.as_ptr(), n) };
            assert!(s.iter().all(|&x| x == 0));
        }
        let c = AlignedBuf::copy_of(&[1, 2, 3]).unwrap();
        assert_eq!(unsafe { std::slice::from_raw_parts(c.as_ptr(), 3) }, &[1, 2, 3]);
    }
}
