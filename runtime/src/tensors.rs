//! Named tensors in safetensors files: the weights of an artifact and the
//! inputs and outputs of `smelt run`.
//!
//! Reading checks the whole file before any tensor is built (header length,
//! JSON header, offsets covering the data exactly) and turns every problem
//! into one line naming the file, and the tensor where there is one. Tensors
//! keep their stored dtype: a bf16 tensor is read as a bf16 [`Tensor`] and
//! written back as bf16 bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use smelt_ir::{DType, StoredTensor, Tensor};

/// Everything that can go wrong reading or writing a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// The file could not be opened, mapped or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a valid safetensors file.
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },

    /// A tensor is stored in a dtype smelt has no tensor type for.
    #[error("{}: tensor `{name}` has dtype {found}, which smelt does not read (supported: F32, F16, BF16, F64, I64, I32, I8, U8, BOOL)", path.display())]
    UnsupportedDType { path: PathBuf, name: String, found: String },

    /// Serialising tensors failed.
    #[error("{}: cannot write safetensors: {msg}", path.display())]
    Write { path: PathBuf, msg: String },
}

/// The safetensors dtype of a smelt dtype (every smelt dtype has one).
pub fn to_safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

/// The smelt dtype of a safetensors dtype, if smelt has one.
pub fn from_safetensors_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Explains a safetensors parse error in terms of the file at hand. The
/// crate's own messages are terse ("invalid header length"), so the common
/// corruptions (truncation, a header length that lies) get a message that
/// says which numbers disagree.
fn describe(err: &SafeTensorError, bytes: &[u8]) -> String {
    let file_len = bytes.len();
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    match err {
        SafeTensorError::HeaderTooSmall => {
            format!("the file is {file_len} bytes, shorter than the 8-byte header length (truncated?)")
        }
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => match header_len {
            Some(n) => format!(
                "the header claims {n} bytes but the file has only {} bytes after the length field (truncated, or the length is wrong)",
                file_len.saturating_sub(8)
            ),
            None => err.to_string(),
        },
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor offsets in the header do not cover the data exactly (truncated, or the header lies)".to_string()
        }
        other => other.to_string(),
    }
}

/// Reads every tensor of a safetensors file, by name.
pub fn read_tensor_file(path: &Path) -> Result<BTreeMap<String, Tensor>, TensorFileError> {
    let io = |source| TensorFileError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and dropped before this function returns;
    // the usual caveat of mapped files (another process truncating it) would
    // surface as a bus error, which is accepted for model files as every
    // safetensors reader does.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    read_tensor_bytes(path, &map)
}

/// Reads every tensor of a safetensors file held in memory; `path` is used in
/// messages only.
pub fn read_tensor_bytes(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, TensorFileError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| TensorFileError::Invalid { path: path.to_path_buf(), msg: describe(&e, bytes) })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = from_safetensors_dtype(view.dtype()).ok_or_else(|| TensorFileError::UnsupportedDType {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: format!("{:?}", view.dtype()),
        })?;
        let t = Tensor::from_le_bytes(name, dtype, view.shape().to_vec(), view.data())
            .map_err(|e| TensorFileError::Invalid { path: path.to_path_buf(), msg: e.to_string() })?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Serialises named tensors to safetensors bytes, each in its own dtype.
pub fn tensor_file_bytes(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>, TensorFileError> {
    let write_err = |msg: String| TensorFileError::Write { path: path.to_path_buf(), msg };
    let bytes: Vec<(&String, Vec<u8>)> = tensors.iter().map(|(n, t)| (n, t.to_le_bytes())).collect();
    let mut views = Vec::with_capacity(bytes.len());
    for ((name, data), t) in bytes.iter().zip(tensors.values()) {
        let view = TensorView::new(to_safetensors_dtype(t.dtype), t.shape.clone(), data)
            .map_err(|e| write_err(format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    safetensors::tensor::serialize(views, None).map_err(|e| write_err(e.to_string()))
}

/// Serialises named stored tensors to safetensors bytes (their bytes as
/// they are).
pub fn stored_file_bytes(path: &Path, tensors: &BTreeMap<String, &StoredTensor>) -> Result<Vec<u8>, TensorFileError> {
    let write_err = |msg: String| TensorFileError::Write { path: path.to_path_buf(), msg };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let view = TensorView::new(to_safetensors_dtype(t.dtype), t.shape.clone(), t.bytes())
            .map_err(|e| write_err(format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    safetensors::tensor::serialize(views, None).map_err(|e| write_err(e.to_string()))
}

/// Writes named tensors to a safetensors file, each in its own dtype.
pub fn write_tensor_file(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), TensorFileError> {
    let bytes = tensor_file_bytes(path, tensors)?;
    std::fs::write(path, bytes).map_err(|source| TensorFileError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), Tensor::from_f32(DType::BF16, vec![2, 2], vec![1.0, -2.5, 0.125, 3.0]).unwrap());
        m.insert("b".to_string(), Tensor::from_i64(DType::I64, vec![3], vec![1, 2, 3]).unwrap());
        m.insert("c".to_string(), Tensor::from_f32(DType::F32, vec![0, 4], vec![]).unwrap());
        m
    }

    #[test]
    fn round_trip_keeps_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write_tensor_file(&p, &sample()).unwrap();
        let back = read_tensor_file(&p).unwrap();
        assert_eq!(back, sample());
        assert_eq!(back["a"].dtype, DType::BF16);
        // bf16 is stored as 2 bytes per element: 8 bytes of `a`, 24 of `b`.
        let st_len = std::fs::metadata(&p).unwrap().len();
        let header = u64::from_le_bytes(std::fs::read(&p).unwrap()[..8].try_into().unwrap());
        assert_eq!(st_len, 8 + header + 8 + 24);
    }

    #[test]
    fn corruptions_are_named() {
        let p = Path::new("x.safetensors");
        let good = tensor_file_bytes(p, &sample()).unwrap();

        let short = read_tensor_bytes(p, &good[..5]).unwrap_err().to_string();
        assert!(short.contains("shorter than the 8-byte header length"), "{short}");

        let truncated = read_tensor_bytes(p, &good[..good.len() - 3]).unwrap_err().to_string();
        assert!(truncated.contains("do not cover the data exactly"), "{truncated}");

        let mut lying = good.clone();
        lying[..8].copy_from_slice(&(good.len() as u64 * 4).to_le_bytes());
        let lie = read_tensor_bytes(p, &lying).unwrap_err().to_string();
        assert!(lie.contains("the header claims"), "{lie}");
        assert!(lie.starts_with("x.safetensors: not a valid safetensors file"), "{lie}");

        let missing = read_tensor_file(Path::new("/nonexistent/dir/x.safetensors")).unwrap_err();
        assert!(matches!(missing, TensorFileError::Io { .. }));
    }
}
