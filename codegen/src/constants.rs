//! Constant data as kernels read it: a weight's stored bytes converted to
//! the element type a kernel loads (f32, or bf16/f16 rounded to nearest
//! even) and laid out as it reads them (transposed, packed), in as few
//! passes over the bytes as the conversion needs, each at memory speed and
//! on all cores. A weight already stored the way a kernel reads it is not
//! copied at all.

use std::hash::{Hash, Hasher};

use smelt_ir::stored::{par_chunks_mut, transpose};
use smelt_ir::{DType, StoredTensor};

/// The bytes of one constant, to be appended to the constants file.
pub enum Chunk {
    /// A stored tensor's bytes as they are (shared, not copied).
    Shared(StoredTensor),
    Owned(Vec<u8>),
}

impl Chunk {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(t) => t.bytes(),
            Chunk::Owned(v) => v,
        }
    }

    /// The chunk for the constants writer.
    pub fn boxed(self) -> Box<dyn AsRef<[u8]> + Send> {
        match self {
            Chunk::Shared(t) => Box::new(t),
            Chunk::Owned(v) => Box::new(v),
        }
    }
}

/// A 2-D float matrix as stored: row-major `rows x cols` elements of
/// `dtype` (f32, bf16 or f16).
pub struct Matrix {
    pub data: Chunk,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

/// The element types [`convert`] reads and writes.
pub fn convertible(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16 | DType::F16)
}

/// `bytes` (elements of `from`) as elements of `to`, rounded to nearest
/// even; `None` when a finite value would overflow `to` (f16 above 65504),
/// so the caller keeps a wider type. Both must be [`convertible`].
pub fn convert(bytes: &[u8], from: DType, to: DType) -> Option<Vec<u8>> {
    let (fs, ts) = (from.size_bytes(), to.size_bytes());
    let n = bytes.len() / fs;
    let mut out = vec![0u8; n * ts];
    let overflow = std::sync::atomic::AtomicBool::new(false);
    par_chunks_mut(&mut out, ts, |first, dst| {
        let src = &bytes[first * fs..][..dst.len() / ts * fs];
        let ok = match (from, to) {
            (DType::BF16, DType::F32) => {
                map(src, dst, |b: [u8; 2]| half::bf16::from_le_bytes(b).to_f32().to_le_bytes())
            }
            (DType::F16, DType::F32) => map(src, dst, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32().to_le_bytes()),
            (DType::F32, DType::BF16) => narrow(src, dst, |b: [u8; 4]| f32::from_le_bytes(b), half::bf16::from_f32),
            (DType::F32, DType::F16) => narrow(src, dst, |b: [u8; 4]| f32::from_le_bytes(b), half::f16::from_f32),
            (DType::F16, DType::BF16) => {
                narrow(src, dst, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32(), half::bf16::from_f32)
            }
            (DType::BF16, DType::F16) => {
                narrow(src, dst, |b: [u8; 2]| half::bf16::from_le_bytes(b).to_f32(), half::f16::from_f32)
            }
            _ => {
                dst.copy_from_slice(src);
                true
            }
        };
        if !ok {
            overflow.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (!overflow.into_inner()).then_some(out)
}

fn map<const F: usize, const T: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; F]) -> [u8; T]) -> bool {
    for (s, d) in src.chunks_exact(F).zip(dst.chunks_exact_mut(T)) {
        d.copy_from_slice(&f(s.try_into().expect("chunks of F")));
    }
    true
}

/// Rounds to a 16-bit float type; false when a finite value overflowed.
fn narrow<const F: usize, H: HalfBits>(
    src: &[u8],
    dst: &mut [u8],
    read: impl Fn([u8; F]) -> f32,
    round: impl Fn(f32) -> H,
) -> bool {
    let mut ok = true;
    for (s, d) in src.chunks_exact(F).zip(dst.chunks_exact_mut(2)) {
        let x = read(s.try_into().expect("chunks of F"));
        let h = round(x);
        ok &= !x.is_finite() || h.finite();
        d.copy_from_slice(&h.le_bytes());
    }
    ok
}

trait HalfBits {
    fn finite(&self) -> bool;
    fn le_bytes(&self) -> [u8; 2];
}

impl HalfBits for half::bf16 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn le_bytes(&self) -> [u8; 2] {
        self.to_le_bytes()
    }
}

impl HalfBits for half::f16 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn le_bytes(&self) -> [u8; 2] {
        self.to_le_bytes()
    }
}

impl Matrix {
    /// The matrix as elements of `to`, transposed when `transposed` is
    /// set: converted first when that makes the elements smaller, else
    /// after. `None` when a value overflows `to`. Stored bytes already in
    /// that form are shared, not copied.
    pub fn laid_out(&self, to: DType, transposed: bool) -> Option<Chunk> {
        let (from, bytes) = (self.dtype, self.data.bytes());
        if !transposed {
            return Some(match &self.data {
                Chunk::Shared(t) if from == to => Chunk::Shared(t.clone()),
                Chunk::Owned(v) if from == to => Chunk::Owned(v.clone()),
                _ => Chunk::Owned(convert(bytes, from, to)?),
            });
        }
        let (rows, cols) = (self.rows, self.cols);
        if from == to {
            return Some(Chunk::Owned(transpose(bytes, rows, cols, to.size_bytes())));
        }
        if to.size_bytes() < from.size_bytes() {
            let c = convert(bytes, from, to)?;
            return Some(Chunk::Owned(transpose(&c, rows, cols, to.size_bytes())));
        }
        let t = transpose(bytes, rows, cols, from.size_bytes());
        convert(&t, from, to).map(Chunk::Owned)
    }
}

/// A cheap key for deduplicating constants: the length and a hash of a
/// sample of the bytes (the start, the end and 256 windows spread between).
/// Constants with equal keys are compared in full before one is reused.
pub fn sample_key(bytes: &[u8]) -> (usize, u64) {
    const SMALL: usize = 64 << 10;
    const EDGE: usize = 4096;
    const WINDOW: usize = 64;
    const WINDOWS: usize = 256;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let n = bytes.len();
    if n <= SMALL {
        bytes.hash(&mut h);
    } else {
        bytes[..EDGE].hash(&mut h);
        bytes[n - EDGE..].hash(&mut h);
        for i in 0..WINDOWS {
            let at = (n - WINDOW) / (WINDOWS - 1) * i;
            bytes[at..at + WINDOW].hash(&mut h);
        }
    }
    (n, h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(d: DType, xs: &[f32]) -> Vec<u8> {
        smelt_ir::Tensor::from_f32(d, vec![xs.len()], xs.to_vec()).unwrap().to_le_bytes()
    }

    #[test]
    fn converts_like_the_tensor_rounding() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.731).sin() * 100.0 + 1e-3 * i as f32).collect();
        for from in [DType::F32, DType::BF16, DType::F16] {
            for to in [DType::F32, DType::BF16, DType::F16] {
                let src = bytes_of(from, &xs);
                let vals = smelt_ir::Tensor::from_le_bytes("x", from, vec![xs.len()], &src).unwrap().to_f32_vec();
                assert_eq!(convert(&src, from, to).unwrap(), bytes_of(to, &vals), "{from} -> {to}");
            }
        }
        assert!(convert(&bytes_of(DType::F32, &[1e5, 1.0]), DType::F32, DType::F16).is_none());
        assert!(convert(&bytes_of(DType::BF16, &[1e5]), DType::BF16, DType::F16).is_none());
        assert!(convert(&bytes_of(DType::F32, &[f32::MAX]), DType::F32, DType::BF16).is_none());
        // Infinities and NaN are not overflow.
        let special = bytes_of(DType::F32, &[f32::INFINITY, f32::NAN, -0.0]);
        assert!(convert(&special, DType::F32, DType::F16).is_some());
        // Large enough to be split over threads.
        let big: Vec<f32> = (0..600_000).map(|i| i as f32 * 0.5).collect();
        let b = bytes_of(DType::F32, &big);
        let vals = smelt_ir::Tensor::from_f32(DType::BF16, vec![big.len()], big.clone()).unwrap().to_f32_vec();
        assert_eq!(convert(&b, DType::F32, DType::BF16).unwrap(), bytes_of(DType::BF16, &vals));
    }

    #[test]
    fn lays_out_transposed_in_either_order() {
        let (rows, cols) = (3, 5);
        let xs: Vec<f32> = (0..15).map(|i| i as f32 + 0.25).collect();
        let t: Vec<f32> = (0..15).map(|i| xs[(i % rows) * cols + i / rows]).collect();
        for from in [DType::F32, DType::BF16] {
            for to in [DType::F32, DType::BF16] {
                let m = Matrix { data: Chunk::Owned(bytes_of(from, &xs)), dtype: from, rows, cols };
                assert_eq!(m.laid_out(to, true).unwrap().bytes(), &bytes_of(to, &t)[..], "{from} -> {to}");
            }
        }
        let m = Matrix { data: Chunk::Owned(bytes_of(DType::F32, &xs)), dtype: DType::F32, rows, cols };
        assert_eq!(m.laid_out(DType::F32, false).unwrap().bytes(), &bytes_of(DType::F32, &xs)[..]);
    }

    #[test]
    fn sample_keys_tell_lengths_and_samples_apart() {
        let a = vec![1u8; 1 << 20];
        let mut b = a.clone();
        assert_eq!(sample_key(&a), sample_key(&b));
        b[0] = 2;
        assert_ne!(sample_key(&a), sample_key(&b));
        assert_ne!(sample_key(&a), sample_key(&a[1..]));
    }
}
