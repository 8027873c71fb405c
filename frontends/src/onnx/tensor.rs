//! Host tensors decoded from ONNX `TensorProto`s: initialisers, `Constant`
//! values, and the standalone `.pb` files of the ONNX backend-test layout
//! (`test_data_set_N/input_K.pb`).
//!
//! What this module assumes and guarantees:
//! - Element data is kept as little-endian bytes ([`TensorBytes`]), exactly as
//!   ONNX's `raw_data` and external data store it. `raw_data` and external data
//!   are borrowed zero-copy (a `bytes::Bytes` slice of a memory map); the typed
//!   fields (`float_data`, `int32_data`, `int64_data`, `double_data`) are
//!   converted into an owned buffer.
//! - Borrowed bytes can sit at any address (external-data offsets need not be
//!   aligned), so reading elements goes through [`Element::from_le_bytes`],
//!   never through a pointer cast.
//! - Supported element types are those with a smelt [`DType`]: FLOAT, FLOAT16,
//!   BFLOAT16, DOUBLE, INT64, INT32, INT8, UINT8, BOOL. Everything else
//!   (UINT16, INT16, UINT32, UINT64, STRING, COMPLEX*, the float8/float6/float4
//!   variants, INT4/UINT4/INT2/UINT2) is rejected with
//!   [`OnnxError::UnsupportedDType`]. We deliberately do not widen UINT16 /
//!   INT16 / UINT32 to a larger integer type: the tensor's dtype would then
//!   disagree with the graph's declared types, and no transformer model needs
//!   them.
//! - External data (`data_location = EXTERNAL`) is resolved relative to the
//!   folder of the file that holds the `TensorProto`, and must stay inside it:
//!   absolute paths, `..` components and symlinks that lead elsewhere are
//!   rejected. Each external file is memory-mapped once and the map is shared
//!   by every tensor that points into it.
//! - Files are memory-mapped on the assumption that nobody modifies them while
//!   they are open (as every mmap-based model loader assumes).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use prost::Message;
use smelt_ir::DType;

use super::error::{DataField, OnnxError};
use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;

/// Little-endian element bytes of a tensor, borrowed from a memory map or owned.
#[derive(Clone, PartialEq, Eq)]
pub enum TensorBytes {
    /// A zero-copy slice of a memory-mapped file (`raw_data` or external data).
    /// It may start at any address: do not cast it to a typed slice.
    Borrowed(Bytes),
    /// Bytes converted from a typed field (`float_data`, `int32_data`, ...).
    Owned(Vec<u8>),
}

impl TensorBytes {
    /// The element bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Borrowed(b) => b,
            TensorBytes::Owned(v) => v,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no bytes (a tensor with a zero dim).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are borrowed from a memory map rather than copied.
    pub fn is_borrowed(&self) -> bool {
        matches!(self, TensorBytes::Borrowed(_))
    }

    /// The bytes as a `Bytes` handle (free for borrowed data, one move for owned).
    pub fn into_bytes(self) -> Bytes {
        match self {
            TensorBytes::Borrowed(b) => b,
            TensorBytes::Owned(v) => Bytes::from(v),
        }
    }
}

impl std::ops::Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

// Printing megabytes of weights in a `{:?}` would bury everything else, so only
// the kind and length are shown.
impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_borrowed() { "Borrowed" } else { "Owned" };
        write!(f, "TensorBytes::{kind}({} bytes)", self.len())
    }
}

/// A tensor decoded from a `TensorProto`, in host memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxTensor {
    /// The `TensorProto` name (empty for anonymous tensors).
    pub name: String,
    pub dtype: DType,
    /// Row-major dims; empty for a scalar.
    pub dims: Vec<usize>,
    /// `product(dims) * dtype.size_bytes()` little-endian bytes.
    pub data: TensorBytes,
}

impl OnnxTensor {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The little-endian element bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The elements as `T`, or `None` when `T` is not this tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Option<Vec<T>> {
        if T::DTYPE != self.dtype {
            return None;
        }
        Some(self.bytes().chunks_exact(T::DTYPE.size_bytes()).map(T::from_le_bytes).collect())
    }

    /// Every element converted to `f32` (integers by value, bools as 0 / 1).
    /// Meant for comparing results and for small constants; large `i64` and
    /// `f64` values lose precision.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.bytes();
        let size = self.dtype.size_bytes();
        let chunks = b.chunks_exact(size);
        match self.dtype {
            DType::F32 => chunks.map(read::<f32>).collect(),
            DType::F16 => chunks.map(|c| read::<half::f16>(c).to_f32()).collect(),
            DType::BF16 => chunks.map(|c| read::<half::bf16>(c).to_f32()).collect(),
            DType::F64 => chunks.map(|c| read::<f64>(c) as f32).collect(),
            DType::I64 => chunks.map(|c| read::<i64>(c) as f32).collect(),
            DType::I32 => chunks.map(|c| read::<i32>(c) as f32).collect(),
            DType::I8 => chunks.map(|c| read::<i8>(c) as f32).collect(),
            DType::U8 => chunks.map(|c| f32::from(c[0])).collect(),
            DType::Bool => chunks.map(|c| if c[0] != 0 { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// Every element as `i64` for integer and bool tensors (shape operands such
    /// as `Reshape`'s shape or `Slice`'s starts), `None` for floating point.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let b = self.bytes();
        let chunks = b.chunks_exact(self.dtype.size_bytes());
        Some(match self.dtype {
            DType::I64 => chunks.map(read::<i64>).collect(),
            DType::I32 => chunks.map(|c| i64::from(read::<i32>(c))).collect(),
            DType::I8 => chunks.map(|c| i64::from(read::<i8>(c))).collect(),
            DType::U8 | DType::Bool => chunks.map(|c| i64::from(c[0])).collect(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => return None,
        })
    }
}

/// A Rust type that holds one element of a smelt dtype, read from
/// little-endian bytes at any alignment.
pub trait Element: Copy {
    /// The dtype whose elements this type holds.
    const DTYPE: DType;
    /// Reads one element from exactly `DTYPE.size_bytes()` little-endian bytes.
    fn from_le_bytes(bytes: &[u8]) -> Self;
}

// `chunks_exact(size_bytes)` hands every impl a slice of exactly its size, so
// the conversion to a fixed-size array cannot fail there; a wrong-length slice
// from another caller reads as zero rather than panicking.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().unwrap_or([0; N])
}

macro_rules! element {
    ($t:ty, $dtype:expr, $n:literal) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn from_le_bytes(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(array::<$n>(bytes))
            }
        }
    };
}

element!(f32, DType::F32, 4);
element!(f64, DType::F64, 8);
element!(i64, DType::I64, 8);
element!(i32, DType::I32, 4);
element!(i8, DType::I8, 1);
element!(u8, DType::U8, 1);
element!(half::f16, DType::F16, 2);
element!(half::bf16, DType::BF16, 2);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn from_le_bytes(bytes: &[u8]) -> Self {
        bytes.first().is_some_and(|&b| b != 0)
    }
}

/// Reads one element through [`Element`] (the inherent `from_le_bytes` of the
/// primitive types takes arrays, not slices).
fn read<T: Element>(bytes: &[u8]) -> T {
    T::from_le_bytes(bytes)
}

/// The smelt dtype of an ONNX `TensorProto.DataType` value, or `None` when
/// smelt has none (see the module docs for the list).
pub fn onnx_dtype(elem_type: i32) -> Option<DType> {
    match DataType::try_from(elem_type).ok()? {
        DataType::Float => Some(DType::F32),
        DataType::Float16 => Some(DType::F16),
        DataType::Bfloat16 => Some(DType::BF16),
        DataType::Double => Some(DType::F64),
        DataType::Int64 => Some(DType::I64),
        DataType::Int32 => Some(DType::I32),
        DataType::Int8 => Some(DType::I8),
        DataType::Uint8 => Some(DType::U8),
        DataType::Bool => Some(DType::Bool),
        _ => None,
    }
}

/// The ONNX spelling of an element type (`FLOAT`, `FLOAT8E4M3FN`, ...), or
/// `unknown element type N` for a value the schema does not define.
pub fn onnx_type_name(elem_type: i32) -> String {
    match DataType::try_from(elem_type) {
        Ok(t) => t.as_str_name().to_string(),
        Err(_) => format!("unknown element type {elem_type}"),
    }
}

/// The ONNX element type of a smelt dtype (the inverse of [`onnx_dtype`]).
pub fn dtype_to_onnx(dtype: DType) -> i32 {
    let t = match dtype {
        DType::F32 => DataType::Float,
        DType::F16 => DataType::Float16,
        DType::BF16 => DataType::Bfloat16,
        DType::F64 => DataType::Double,
        DType::I64 => DataType::Int64,
        DType::I32 => DataType::Int32,
        DType::I8 => DataType::Int8,
        DType::U8 => DataType::Uint8,
        DType::Bool => DataType::Bool,
    };
    t as i32
}

/// Reads a standalone `TensorProto` file, such as the backend-test layout's
/// `test_data_set_N/input_K.pb`. External data, if any, is resolved relative
/// to the file's folder.
pub fn read_tensor_pb(path: impl AsRef<Path>) -> Result<OnnxTensor, OnnxError> {
    let path = path.as_ref();
    let data = map_file(path).map_err(|source| OnnxError::Io { file: path.to_path_buf(), source })?;
    let proto = TensorProto::decode(data).map_err(|source| OnnxError::Decode {
        file: path.to_path_buf(),
        message: "TensorProto",
        source,
    })?;
    TensorStore::new(path.to_path_buf()).decode(&proto)
}

/// Memory-maps a whole file as a `Bytes` handle whose slices keep the map alive.
pub(crate) fn map_file(path: &Path) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    // An empty file cannot be mapped on every platform, and there is nothing
    // to borrow from it anyway.
    if meta.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only and lives as long as any `Bytes` slice of
    // it. The usual mmap caveat applies: the file must not be truncated or
    // rewritten while the model is open (documented in the module header).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(Bytes::from_owner(map))
}

/// Decodes `TensorProto`s that belong to one file (a model or a `.pb`), and
/// owns the memory maps of the external-data files they point into.
pub(crate) struct TensorStore {
    /// The file the protos came from, named in every error.
    file: PathBuf,
    /// The folder external-data locations are relative to.
    dir: PathBuf,
    /// External files mapped so far, by canonical path. A mutex (not a
    /// `RefCell`) keeps `OnnxModel` `Sync`, so initialisers can be decoded
    /// from several threads.
    maps: Mutex<HashMap<PathBuf, Bytes>>,
}

impl TensorStore {
    pub(crate) fn new(file: PathBuf) -> Self {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        TensorStore { file, dir, maps: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn file(&self) -> &Path {
        &self.file
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Decodes one `TensorProto` into a host tensor, checking its size.
    pub(crate) fn decode(&self, t: &TensorProto) -> Result<OnnxTensor, OnnxError> {
        let name = display_name(t.name());
        let invalid =
            |reason: String| OnnxError::InvalidTensor { file: self.file.clone(), tensor: name.clone(), reason };

        if t.segment.is_some() {
            return Err(invalid("segmented tensors (TensorProto.segment) are not supported".into()));
        }
        if t.data_type() == DataType::Undefined as i32 {
            return Err(invalid("data_type is missing (UNDEFINED)".into()));
        }
        let dtype = onnx_dtype(t.data_type()).ok_or_else(|| OnnxError::UnsupportedDType {
            file: self.file.clone(),
            tensor: name.clone(),
            onnx_type_name: onnx_type_name(t.data_type()),
        })?;

        let mut dims = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            let d = usize::try_from(d).map_err(|_| invalid(format!("dims {:?} contain a negative dim", t.dims)))?;
            dims.push(d);
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("dims {:?} overflow the element count", t.dims)))?;
        let nbytes = numel
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| invalid(format!("dims {:?} overflow the byte size", t.dims)))?;

        let size_error = |field: DataField, expected, found| OnnxError::DataSize {
            file: self.file.clone(),
            tensor: name.clone(),
            dtype,
            dims: dims.clone(),
            field,
            expected,
            found,
        };

        let data = if t.data_location() == DataLocation::External {
            let bytes = self.external(t, &name)?;
            if bytes.len() != nbytes {
                return Err(size_error(DataField::ExternalData, nbytes, bytes.len()));
            }
            TensorBytes::Borrowed(bytes)
        } else if let Some(raw) = &t.raw_data {
            if raw.len() != nbytes {
                return Err(size_error(DataField::RawData, nbytes, raw.len()));
            }
            TensorBytes::Borrowed(raw.clone())
        } else {
            // Typed fields: check the element count before allocating anything,
            // so a lying header cannot make us allocate a huge buffer.
            let (field, found) = match dtype {
                DType::F32 => (DataField::FloatData, t.float_data.len()),
                DType::F64 => (DataField::DoubleData, t.double_data.len()),
                DType::I64 => (DataField::Int64Data, t.int64_data.len()),
                DType::F16 | DType::BF16 | DType::I32 | DType::I8 | DType::U8 | DType::Bool => {
                    (DataField::Int32Data, t.int32_data.len())
                }
            };
            if found != numel {
                return Err(size_error(field, numel, found));
            }
            TensorBytes::Owned(typed_to_le_bytes(t, dtype, nbytes))
        };

        Ok(OnnxTensor { name: t.name().to_string(), dtype, dims, data })
    }

    /// The bytes an external-data tensor points to, sliced from the (cached)
    /// memory map of its file.
    fn external(&self, t: &TensorProto, name: &str) -> Result<Bytes, OnnxError> {
        let mut location = None;
        let mut offset = None;
        let mut length = None;
        for entry in &t.external_data {
            match entry.key() {
                "location" => location = Some(entry.value()),
                "offset" => offset = Some(entry.value()),
                "length" => length = Some(entry.value()),
                // `checksum` and unknown keys carry nothing we need.
                _ => {}
            }
        }
        let location = location.ok_or_else(|| OnnxError::InvalidTensor {
            file: self.file.clone(),
            tensor: name.to_string(),
            reason: "data_location is EXTERNAL but external_data has no `location` key".into(),
        })?;
        let data_error = |reason: String| OnnxError::ExternalData {
            file: self.file.clone(),
            tensor: name.to_string(),
            location: location.to_string(),
            reason,
        };
        let parse = |key: &str, v: Option<&str>| -> Result<Option<usize>, OnnxError> {
            v.map(|s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| data_error(format!("`{key}` is `{s}`, expected a non-negative integer")))
            })
            .transpose()
        };
        let offset = parse("offset", offset)?.unwrap_or(0);
        let length = parse("length", length)?;

        let path = self.resolve(location, name)?;
        let whole = self.mapped(&path).map_err(|e| data_error(format!("cannot read {}: {e}", path.display())))?;
        if offset > whole.len() {
            return Err(data_error(format!(
                "offset {offset} is past the end of {} ({} bytes)",
                path.display(),
                whole.len()
            )));
        }
        let end = match length {
            Some(len) => offset.checked_add(len).filter(|&e| e <= whole.len()).ok_or_else(|| {
                data_error(format!(
                    "offset {offset} + length {len} is past the end of {} ({} bytes)",
                    path.display(),
                    whole.len()
                ))
            })?,
            None => whole.len(),
        };
        Ok(whole.slice(offset..end))
    }

    /// Resolves an external-data location to a canonical path inside the
    /// folder of the file being read, or explains why it is refused.
    fn resolve(&self, location: &str, name: &str) -> Result<PathBuf, OnnxError> {
        let refuse = |reason: String| OnnxError::ExternalPath {
            file: self.file.clone(),
            tensor: name.to_string(),
            location: location.to_string(),
            reason,
        };
        let rel = Path::new(location);
        if location.is_empty() {
            return Err(refuse("it is empty".into()));
        }
        if rel.is_absolute() || rel.has_root() {
            return Err(refuse("absolute paths are refused; it must be relative to the model's folder".into()));
        }
        for c in rel.components() {
            match c {
                Component::ParentDir => {
                    return Err(refuse("`..` is refused; external data must live inside the model's folder".into()))
                }
                Component::Prefix(_) | Component::RootDir => {
                    return Err(refuse("absolute paths are refused; it must be relative to the model's folder".into()))
                }
                Component::CurDir | Component::Normal(_) => {}
            }
        }
        let dir = self.dir.canonicalize().map_err(|e| OnnxError::ExternalData {
            file: self.file.clone(),
            tensor: name.to_string(),
            location: location.to_string(),
            reason: format!("cannot resolve the model folder {}: {e}", self.dir.display()),
        })?;
        let joined = dir.join(rel);
        let full = joined.canonicalize().map_err(|e| OnnxError::ExternalData {
            file: self.file.clone(),
            tensor: name.to_string(),
            location: location.to_string(),
            reason: format!("cannot open {}: {e}", joined.display()),
        })?;
        // Components were checked above, so only a symlink can get here with a
        // path outside the folder.
        if !full.starts_with(&dir) {
            return Err(refuse(format!(
                "it resolves to {}, outside the model's folder {} (through a symlink)",
                full.display(),
                dir.display()
            )));
        }
        Ok(full)
    }

    /// The whole memory-mapped file at a canonical path, mapped on first use.
    fn mapped(&self, path: &Path) -> std::io::Result<Bytes> {
        // A poisoned lock only means another thread panicked while inserting;
        // the map itself is still consistent, so keep using it.
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = maps.get(path) {
            return Ok(b.clone());
        }
        let b = map_file(path)?;
        maps.insert(path.to_path_buf(), b.clone());
        Ok(b)
    }
}

/// A tensor name as shown in error messages.
pub(crate) fn display_name(name: &str) -> String {
    if name.is_empty() {
        "<unnamed>".to_string()
    } else {
        name.to_string()
    }
}

/// Converts the typed field that holds `dtype` into little-endian element
/// bytes. The caller has checked that the field holds exactly
/// `nbytes / dtype.size_bytes()` values.
fn typed_to_le_bytes(t: &TensorProto, dtype: DType, nbytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(nbytes);
    match dtype {
        DType::F32 => t.float_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => t.double_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I64 => t.int64_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I32 => t.int32_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // ONNX stores 16-bit floats as their bit patterns in the low 16 bits
        // of each int32 value; the truncating casts keep exactly those bits.
        DType::F16 | DType::BF16 => t.int32_data.iter().for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        // 8-bit integers are stored by value; the spec requires them to be in
        // range, and truncation keeps the low byte if a writer did not comply.
        DType::I8 | DType::U8 => t.int32_data.iter().for_each(|&v| out.push(v as u8)),
        DType::Bool => t.int32_data.iter().for_each(|&v| out.push(u8::from(v != 0))),
    }
    out
}
