//! Tensors kept as their stored bytes: what a compiler reads weights as.
//!
//! A [`Tensor`] holds every float dtype as `f32` values, which suits the
//! interpreter but doubles a bf16 checkpoint in memory and costs a widening
//! pass over every weight. A [`StoredTensor`] is the little-endian element
//! bytes in the tensor's own dtype, shared (cloning is cheap) and possibly
//! borrowed from a memory-mapped file, so a compile can read each weight
//! once, where it is placed, in the dtype it is stored in.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::tensor::TensorError;
use crate::{DType, Tensor};

/// Whatever owns the bytes: a `Vec<u8>`, a memory map.
pub type ByteOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A dense, row-major tensor as little-endian bytes of its dtype.
#[derive(Clone)]
pub struct StoredTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    owner: ByteOwner,
    range: Range<usize>,
}

impl StoredTensor {
    /// The tensor whose bytes are `owner[range]`; the length must be what
    /// `dtype` and `shape` need.
    pub fn new(
        what: &str,
        dtype: DType,
        shape: Vec<usize>,
        owner: ByteOwner,
        range: Range<usize>,
    ) -> Result<StoredTensor, TensorError> {
        let n: usize = shape.iter().product();
        let expected = n * dtype.size_bytes();
        let len = (*owner).as_ref().get(range.clone()).map_or(usize::MAX, <[u8]>::len);
        if len != expected {
            return Err(TensorError::Bytes { what: what.to_string(), len, expected, dtype, shape });
        }
        Ok(StoredTensor { dtype, shape, owner, range })
    }

    /// The tensor holding `bytes`.
    pub fn from_bytes(
        what: &str,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<StoredTensor, TensorError> {
        let len = bytes.len();
        StoredTensor::new(what, dtype, shape, Arc::new(bytes), 0..len)
    }

    /// A tensor's values stored in its dtype (f16/bf16 values are already
    /// rounded to it, so nothing is lost).
    pub fn from_tensor(t: &Tensor) -> StoredTensor {
        let bytes = t.to_le_bytes();
        let len = bytes.len();
        StoredTensor { dtype: t.dtype, shape: t.shape.clone(), owner: Arc::new(bytes), range: 0..len }
    }

    /// The values as a [`Tensor`] (floats widened to f32, as tensors hold them).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_le_bytes("stored tensor", self.dtype, self.shape.clone(), self.bytes())
            .expect("the length was checked when the stored tensor was made")
    }

    /// The element bytes, row-major, little-endian. Not necessarily aligned
    /// for the element type.
    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether both hold the very same bytes (the same owner and range), as
    /// a tied weight read twice from one checkpoint does.
    pub fn same_bytes(&self, other: &StoredTensor) -> bool {
        Arc::ptr_eq(&self.owner, &other.owner) && self.range == other.range
    }
}

impl AsRef<[u8]> for StoredTensor {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl fmt::Debug for StoredTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoredTensor({}{:?}, {} bytes)", self.dtype, self.shape, self.range.len())
    }
}

impl PartialEq for StoredTensor {
    fn eq(&self, other: &StoredTensor) -> bool {
        self.dtype == other.dtype && self.shape == other.shape && self.bytes() == other.bytes()
    }
}

/// Below this many bytes an operation runs on the calling thread only.
const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// Runs `f(first, chunk)` over `dst` split into chunks of whole `unit`s
/// (`first` is the index of the chunk's first unit), on all cores when
/// `dst` is large. Chunks are contiguous, one per thread.
pub fn par_chunks_mut(dst: &mut [u8], unit: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let unit = unit.max(1);
    let units = dst.len() / unit;
    let threads = if dst.len() < PARALLEL_MIN_BYTES {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(units).max(1)
    };
    if threads == 1 {
        f(0, dst);
        return;
    }
    let per = units.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in dst.chunks_mut(per * unit).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// Writes the transpose of `src`, a row-major `[rows, cols]` matrix of
/// `esize`-byte elements, into `dst`, a row-major `[cols, stride]` matrix of
/// the same elements, at column `at`: `dst[j][at + i] = src[i][j]`. Blocked
/// so both sides stay in cache, and split over threads by rows of `dst`.
pub fn transpose_into(src: &[u8], rows: usize, cols: usize, esize: usize, dst: &mut [u8], stride: usize, at: usize) {
    assert_eq!(src.len(), rows * cols * esize, "transpose_into: source is not [{rows}, {cols}] x {esize} bytes");
    assert!(at + rows <= stride && dst.len() == cols * stride * esize, "transpose_into: destination too small");
    match esize {
        1 => transpose_n::<1>(src, rows, cols, dst, stride, at),
        2 => transpose_n::<2>(src, rows, cols, dst, stride, at),
        4 => transpose_n::<4>(src, rows, cols, dst, stride, at),
        8 => transpose_n::<8>(src, rows, cols, dst, stride, at),
        _ => unreachable!("element sizes are 1, 2, 4 or 8 bytes"),
    }
}

/// The transpose of a row-major `[rows, cols]` matrix of `esize`-byte elements.
pub fn transpose(src: &[u8], rows: usize, cols: usize, esize: usize) -> Vec<u8> {
    let mut dst = vec![0u8; src.len()];
    transpose_into(src, rows, cols, esize, &mut dst, rows, 0);
    dst
}

fn transpose_n<const N: usize>(src: &[u8], rows: usize, cols: usize, dst: &mut [u8], stride: usize, at: usize) {
    // Tiles of B x B elements: B rows of the source and B of the
    // destination, 64 bytes or more each, fit in L1 together.
    const B: usize = 32;
    if rows == 0 || cols == 0 {
        return;
    }
    par_chunks_mut(dst, stride * N, |j0, out| {
        let j_end = j0 + out.len() / (stride * N);
        for jb in (j0..j_end).step_by(B) {
            let je = (jb + B).min(j_end);
            for ib in (0..rows).step_by(B) {
                let ie = (ib + B).min(rows);
                for j in jb..je {
                    let row = &mut out[(j - j0) * stride * N..][(at + ib) * N..(at + ie) * N];
                    for (i, d) in (ib..ie).zip(row.chunks_exact_mut(N)) {
                        d.copy_from_slice(&src[(i * cols + j) * N..][..N]);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_lengths() {
        for d in DType::ALL {
            let t = Tensor::from_f64(d, vec![2, 3], vec![1.0, 0.0, 3.0, 2.0, -1.0, 0.5]).unwrap();
            let s = StoredTensor::from_tensor(&t);
            assert_eq!(s.bytes(), &t.to_le_bytes()[..], "{d}");
            assert_eq!(s.to_tensor(), t, "{d}");
        }
        let e = StoredTensor::from_bytes("w", DType::BF16, vec![3], vec![0; 5]).unwrap_err();
        assert_eq!(e.to_string(), "w: byte length 5 is not 6 (bf16[3])");
        let owner: ByteOwner = Arc::new(vec![0u8; 8]);
        assert!(StoredTensor::new("w", DType::F32, vec![2], owner.clone(), 4..12).is_err());
        let a = StoredTensor::new("w", DType::F32, vec![1], owner.clone(), 4..8).unwrap();
        let b = StoredTensor::new("w", DType::F32, vec![1], owner, 4..8).unwrap();
        assert!(a.same_bytes(&b) && a == b);
    }

    #[test]
    fn transposes_blocked_and_into_columns() {
        for (rows, cols) in [(1, 1), (3, 5), (33, 70), (64, 64), (100, 7)] {
            for esize in [1, 2, 4, 8] {
                let src: Vec<u8> = (0..rows * cols * esize).map(|i| (i * 7 % 251) as u8).collect();
                let t = transpose(&src, rows, cols, esize);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(t[(j * rows + i) * esize..][..esize], src[(i * cols + j) * esize..][..esize]);
                    }
                }
                // Into columns 2.. of a wider matrix; the rest is untouched.
                let stride = rows + 3;
                let mut wide = vec![0xAAu8; cols * stride * esize];
                transpose_into(&src, rows, cols, esize, &mut wide, stride, 2);
                for j in 0..cols {
                    let row = &wide[j * stride * esize..][..stride * esize];
                    assert_eq!(&row[2 * esize..(2 + rows) * esize], &t[j * rows * esize..][..rows * esize]);
                    assert!(row[..2 * esize].iter().chain(&row[(2 + rows) * esize..]).all(|&b| b == 0xAA));
                }
            }
        }
        // Large enough to run on several threads.
        let (rows, cols) = (700, 900);
        let src: Vec<u8> = (0..rows * cols * 2).map(|i| (i % 253) as u8).collect();
        let t = transpose(&src, rows, cols, 2);
        assert_eq!(transpose(&t, cols, rows, 2), src);
    }
}
