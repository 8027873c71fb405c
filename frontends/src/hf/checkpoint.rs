//! A Hugging Face checkpoint folder opened for reading: `config.json` parsed
//! into an [`HfConfig`], and the safetensors weights memory-mapped, either one
//! `model.safetensors` or the shards listed in `model.safetensors.index.json`.
//!
//! Tensors are handed out as [`TensorRef`]s that borrow the mapped bytes, so
//! opening a checkpoint costs the headers only. Headers are validated by the
//! `safetensors` crate (offsets contiguous, sizes matching shape x dtype, the
//! data section exactly filling the file); its errors are rewritten into
//! messages that name the file and, where it can be found, the tensor.
//!
//! Assumptions: the files are not modified while a `Checkpoint` is alive (a
//! memory map of a file that changes underneath is undefined behaviour, the
//! usual caveat of every mmap-based loader). Shard names in the index must be
//! plain relative paths inside the folder; symlinks are followed, because the
//! Hugging Face cache stores shards as symlinks into a blob folder.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensorError};
use safetensors::SafeTensors;
use serde_json::Value;
use smelt_ir::{DType, StoredTensor};

use super::config::HfConfig;
use super::error::{describe_json, HfError};

/// The single-file weights name.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The sharded weights index name.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

/// A borrowed view of one tensor in a mapped weight file.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The little-endian element bytes, row-major. Not necessarily aligned
    /// for the element type.
    pub bytes: &'a [u8],
    /// The weight file (relative to the checkpoint folder) holding the tensor.
    pub file: &'a str,
}

impl TensorRef<'_> {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements converted to f32 (from f32, f16, bf16 or f64). Integer and
    /// bool tensors are an error: weights are expected to be floating point.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, HfError> {
        // The bytes may sit at any offset in the file, so read element by
        // element from little-endian bytes instead of casting the slice.
        let out = match self.dtype {
            DType::F32 => self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => self.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => {
                self.bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            DType::F64 => self
                .bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            other => {
                return Err(HfError::WrongDType {
                    name: self.name.to_string(),
                    found: other.name().to_string(),
                    expected: FLOAT_DTYPES.to_string(),
                })
            }
        };
        Ok(out)
    }
}

const FLOAT_DTYPES: &str = "a float dtype (f32, f16, bf16, f64)";

/// One mapped weight file.
struct WeightFile {
    /// Path relative to the checkpoint folder, as named in messages.
    name: String,
    /// Shared with the [`StoredTensor`]s handed out, which may outlive the
    /// checkpoint.
    map: Arc<Mmap>,
}

/// Where one tensor lives: its file and its absolute byte range in the map.
struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint folder.
pub struct Checkpoint {
    dir: PathBuf,
    config: HfConfig,
    files: Vec<WeightFile>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("arch", &self.config.arch)
            .field("files", &self.weight_files())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json` and maps `model.safetensors` or, when
    /// that is absent, every shard of `model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint, HfError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(HfError::MissingConfig { dir });
        }
        let config = HfConfig::from_file(&config_path)?;

        let mut ckpt = Checkpoint { dir, config, files: Vec::new(), tensors: BTreeMap::new() };
        if ckpt.dir.join(SAFETENSORS_FILE).is_file() {
            let entries = ckpt.map_file(SAFETENSORS_FILE)?;
            ckpt.tensors.extend(entries);
        } else if ckpt.dir.join(SAFETENSORS_INDEX_FILE).is_file() {
            ckpt.open_shards()?;
        } else {
            return Err(HfError::MissingWeights { dir: ckpt.dir });
        }
        Ok(ckpt)
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// The mapped weight files, relative to [`Checkpoint::dir`].
    pub fn weight_files(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, in whatever dtype it is stored.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>, HfError> {
        let Some((key, entry)) = self.tensors.get_key_value(name) else {
            return Err(HfError::MissingTensor {
                name: name.to_string(),
                searched: self.weight_files().into_iter().map(String::from).collect(),
            });
        };
        let file = &self.files[entry.file];
        let dtype = dtype_from_safetensors(entry.dtype).ok_or_else(|| HfError::UnsupportedDType {
            file: file.name.clone(),
            name: key.clone(),
            found: format!("{:?}", entry.dtype),
        })?;
        // The range was validated against the file when it was opened; a
        // failure here would mean the map changed size, reported, not panicked.
        let bytes = file.map.get(entry.start..entry.end).ok_or_else(|| HfError::SafetensorsHeader {
            file: file.name.clone(),
            msg: format!("tensor `{key}` lies outside the mapped file"),
        })?;
        Ok(TensorRef { name: key, dtype, shape: entry.shape.clone(), bytes, file: &file.name })
    }

    /// The tensor `name` as a [`StoredTensor`] sharing the mapped bytes (no
    /// copy; the map stays alive as long as the tensor).
    pub fn get_stored(&self, name: &str) -> Result<StoredTensor, HfError> {
        let t = self.get(name)?;
        let entry = &self.tensors[name];
        let file = &self.files[entry.file];
        let owner: smelt_ir::stored::ByteOwner = file.map.clone();
        StoredTensor::new(name, t.dtype, t.shape, owner, entry.start..entry.end)
            .map_err(|e| HfError::invalid(&file.name, e.to_string()))
    }

    /// The tensor `name`, checked to have `expected_shape` and a float dtype.
    /// `why` says where the expected shape comes from and is part of the
    /// message, e.g. "num_key_value_heads=2 x head_dim=32 rows from config.json".
    pub fn expect(&self, name: &str, expected_shape: &[usize], why: &str) -> Result<TensorRef<'_>, HfError> {
        let t = self.get(name)?;
        if t.shape != expected_shape {
            return Err(HfError::ShapeMismatch {
                name: name.to_string(),
                found: t.shape,
                expected: expected_shape.to_vec(),
                why: why.to_string(),
            });
        }
        if !t.dtype.is_float() {
            return Err(HfError::WrongDType {
                name: name.to_string(),
                found: t.dtype.name().to_string(),
                expected: FLOAT_DTYPES.to_string(),
            });
        }
        Ok(t)
    }

    /// Maps one safetensors file, records it and returns its tensors.
    fn map_file(&mut self, rel: &str) -> Result<Vec<(String, Entry)>, HfError> {
        let path = self.dir.join(rel);
        let file = File::open(&path).map_err(|e| HfError::io(&path, e))?;
        let len = file.metadata().map_err(|e| HfError::io(&path, e))?.len();
        if len < 8 {
            // Checked before mapping: an empty file cannot be mapped on every
            // platform, and the message is clearer than the crate's.
            return Err(HfError::SafetensorsHeader {
                file: path.display().to_string(),
                msg: format!("file is {len} bytes, too short for the 8-byte header length"),
            });
        }
        // SAFETY: the map is read-only and we assume (as documented at the top
        // of this module) that nobody truncates or rewrites the file while the
        // checkpoint is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| HfError::io(&path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| header_error(&path.display().to_string(), &map, e))?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = Entry {
                    file: index,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (name, entry)
            })
            .collect();
        self.files.push(WeightFile { name: rel.to_string(), map: Arc::new(map) });
        Ok(entries)
    }

    fn open_shards(&mut self) -> Result<(), HfError> {
        let index_path = self.dir.join(SAFETENSORS_INDEX_FILE);
        let index_name = index_path.display().to_string();
        let text = std::fs::read_to_string(&index_path).map_err(|e| HfError::io(&index_path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| HfError::json(&index_name, &e))?;
        let weight_map = match value.get("weight_map") {
            None | Some(Value::Null) => return Err(HfError::MissingKey { file: index_name, key: "weight_map".into() }),
            Some(Value::Object(m)) if !m.is_empty() => m,
            Some(v) => {
                return Err(HfError::bad_value(
                    &index_name,
                    "weight_map",
                    describe_json(v),
                    "an object mapping tensor names to shard files",
                ))
            }
        };

        // Shards in order of first appearance (sorted names make that the
        // usual 00001-of-N order), each with the first tensor mapped to it
        // for the message when it is missing.
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        let mut shard_order: Vec<(&str, &str)> = Vec::new();
        for (tensor, shard) in weight_map {
            let Some(shard) = shard.as_str() else {
                return Err(HfError::bad_value(
                    &index_name,
                    &format!("weight_map.{tensor}"),
                    describe_json(shard),
                    "a shard file name",
                ));
            };
            if !is_plain_relative(shard) {
                return Err(HfError::ShardOutsideDir { index: index_name, shard: shard.to_string() });
            }
            if !shard_order.iter().any(|(s, _)| *s == shard) {
                shard_order.push((shard, tensor));
            }
            wanted.insert(tensor, shard);
        }
        shard_order.sort();

        let mut by_shard: HashMap<String, HashMap<String, Entry>> = HashMap::new();
        for (shard, first_tensor) in &shard_order {
            if !self.dir.join(shard).is_file() {
                return Err(HfError::MissingShard {
                    index: index_name,
                    shard: shard.to_string(),
                    tensor: first_tensor.to_string(),
                    dir: self.dir.clone(),
                });
            }
            let entries = self.map_file(shard)?;
            by_shard.insert(shard.to_string(), entries.into_iter().collect());
        }

        // The index decides which shard holds a tensor; a tensor the index
        // places in a shard that lacks it is an error rather than a silent
        // fallback to another copy.
        for (tensor, shard) in &wanted {
            let entry = by_shard.get_mut(*shard).and_then(|entries| entries.remove(*tensor)).ok_or_else(|| {
                HfError::TensorNotInShard {
                    index: index_name.clone(),
                    tensor: tensor.to_string(),
                    shard: shard.to_string(),
                }
            })?;
            self.tensors.insert(tensor.to_string(), entry);
        }
        // Tensors the index does not mention are still readable; the first
        // shard (in order) that has one wins.
        for (shard, _) in &shard_order {
            if let Some(entries) = by_shard.remove(*shard) {
                for (name, entry) in entries {
                    self.tensors.entry(name).or_insert(entry);
                }
            }
        }
        Ok(())
    }
}

/// True for a non-empty relative path made only of normal components (no
/// `..`, no root, no drive prefix), so it names something inside the folder.
fn is_plain_relative(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The IR dtype of a safetensors dtype, for the ones smelt reads.
pub fn dtype_from_safetensors(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I8 => DType::I8,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The safetensors dtype of an IR dtype (every IR dtype has one).
pub fn dtype_to_safetensors(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        DType::I8 => StDtype::I8,
        DType::U8 => StDtype::U8,
        DType::Bool => StDtype::BOOL,
    }
}

/// Rewrites a safetensors validation error into a message naming what is
/// wrong, looking into the header JSON where the crate's error is vague.
fn header_error(file: &str, buf: &[u8], err: SafeTensorError) -> HfError {
    let len = buf.len();
    let declared = buf.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes).unwrap_or(0);
    let header = || -> Option<Vec<HeaderEntry>> {
        let end = usize::try_from(declared).ok()?.checked_add(8)?;
        let text = std::str::from_utf8(buf.get(8..end)?).ok()?;
        parse_header_entries(text)
    };
    let msg = match err {
        SafeTensorError::HeaderTooSmall => {
            format!("file is {len} bytes, too short for the 8-byte header length")
        }
        SafeTensorError::HeaderTooLarge => {
            format!("header length {declared} is above the safetensors limit of 100000000 bytes (file is {len} bytes)")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("header length {declared} goes beyond the end of the file ({len} bytes; truncated file?)")
        }
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid safetensors JSON: {e}")
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("data offsets of tensor `{name}` overlap the previous tensor or leave a gap before it")
        }
        SafeTensorError::TensorInvalidInfo => {
            let bad = header().and_then(|entries| {
                entries.into_iter().find(|e| e.needed_bytes() != Some(e.end.wrapping_sub(e.start)))
            });
            match bad {
                Some(e) => format!(
                    "tensor `{}` has data offsets [{}, {}] ({} bytes), but shape {:?} of {} needs {} bytes",
                    e.name,
                    e.start,
                    e.end,
                    e.end.wrapping_sub(e.start),
                    e.shape,
                    e.dtype,
                    e.needed_bytes().map_or("more than usize".to_string(), |n| n.to_string()),
                ),
                None => "a tensor's data offsets do not match its shape and dtype".to_string(),
            }
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            let data_len = len.saturating_sub(8).saturating_sub(declared as usize);
            match header().and_then(|entries| entries.iter().map(|e| e.end).max()) {
                Some(end) if end > data_len => format!(
                    "tensor data ends at byte {end} of the data section, but the file holds only {data_len} data bytes (truncated file?)"
                ),
                Some(end) => format!(
                    "tensor data ends at byte {end} of the data section, but the file holds {data_len} data bytes (trailing bytes)"
                ),
                None => "tensor offsets do not cover the data section exactly".to_string(),
            }
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape x dtype size overflows".to_string(),
        other => other.to_string(),
    };
    HfError::SafetensorsHeader { file: file.to_string(), msg }
}

/// One tensor as the header JSON describes it, read loosely for diagnostics.
struct HeaderEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl HeaderEntry {
    fn needed_bytes(&self) -> Option<usize> {
        let bits: usize = match self.dtype.as_str() {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
            "I16" | "U16" | "F16" | "BF16" => 16,
            "I32" | "U32" | "F32" => 32,
            "I64" | "U64" | "F64" | "C64" => 64,
            _ => return None,
        };
        let n = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        n.checked_mul(bits).map(|b| b / 8)
    }
}

fn parse_header_entries(text: &str) -> Option<Vec<HeaderEntry>> {
    let value: Value = serde_json::from_str(text).ok()?;
    let map = value.as_object()?;
    let mut out = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = v.get("data_offsets")?.as_array()?;
        out.push(HeaderEntry {
            name: name.clone(),
            dtype: v.get("dtype")?.as_str()?.to_string(),
            shape: v
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()?,
            start: usize::try_from(offsets.first()?.as_u64()?).ok()?,
            end: usize::try_from(offsets.get(1)?.as_u64()?).ok()?,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const FIXTURES: &str = "/work/shared/fixtures";

    const TINY_CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}"#;

    /// Writes a safetensors file by hand: header JSON then data.
    fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn folder_with(weights: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), TINY_CONFIG).unwrap();
        for (name, bytes) in weights {
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    fn f32_bytes(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn open_err(dir: &Path) -> String {
        match Checkpoint::open(dir) {
            Ok(c) => panic!("expected an error, opened {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn good_file() -> Vec<u8> {
        let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#;
        let mut data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        data.extend_from_slice(&7i64.to_le_bytes());
        raw_safetensors(header, &data)
    }

    #[test]
    fn reads_tensors_and_checks_them() {
        let dir = folder_with(&[("model.safetensors", good_file())]);
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.tensor_names(), vec!["a", "b"]);
        assert!(c.contains("a") && !c.contains("c"));
        let a = c.expect("a", &[2, 2], "test").unwrap();
        assert_eq!((a.dtype, a.file), (DType::F32, "model.safetensors"));
        assert_eq!(a.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);

        assert_eq!(
            c.expect("a", &[4, 2], "hidden_size=4 rows from config.json").unwrap_err().to_string(),
            "tensor `a` has shape [2, 2], expected [4, 2] (hidden_size=4 rows from config.json)"
        );
        assert_eq!(
            c.expect("b", &[1], "x").unwrap_err().to_string(),
            "tensor `b` has dtype i64, expected a float dtype (f32, f16, bf16, f64)"
        );
        assert!(c.get("b").unwrap().to_f32_vec().is_err());
        assert_eq!(
            c.get("model.norm.weight").unwrap_err().to_string(),
            "tensor `model.norm.weight` missing from checkpoint (searched model.safetensors)"
        );
    }

    #[test]
    fn half_precision_conversion() {
        let header = r#"{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},"d":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},"q":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[16,17]}}"#;
        let mut data = Vec::new();
        for x in [1.5f32, -2.0] {
            data.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        }
        for x in [0.25f32, 3.0] {
            data.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
        }
        data.extend_from_slice(&0.5f64.to_le_bytes());
        data.push(0);
        let dir = folder_with(&[("model.safetensors", raw_safetensors(header, &data))]);
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.get("h").unwrap().to_f32_vec().unwrap(), vec![1.5, -2.0]);
        assert_eq!(c.get("b").unwrap().to_f32_vec().unwrap(), vec![0.25, 3.0]);
        assert_eq!(c.get("d").unwrap().to_f32_vec().unwrap(), vec![0.5]);
        assert_eq!(
            c.get("q").unwrap_err().to_string(),
            "model.safetensors: tensor `q` has dtype F8_E4M3, which smelt does not read \
             (supported: F32, F16, BF16, F64, I64, I32, I8, U8, BOOL)"
        );
    }

    #[test]
    fn bad_headers() {
        let good = good_file();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "model.safetensors: invalid header: file is 3 bytes, too short for the 8-byte header length"),
            (good[..good.len() - 5].to_vec(),
             "model.safetensors: invalid header: tensor data ends at byte 24 of the data section, but the file holds only 19 data bytes (truncated file?)"),
            (good[..40].to_vec(), "model.safetensors: invalid header: header length"),
            ({
                let mut b = good.clone();
                b[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
                b
            }, "model.safetensors: invalid header: header length 1000000 goes beyond the end of the file"),
            ({
                let mut b = good.clone();
                b.extend_from_slice(&[0; 4]);
                b
            }, "(trailing bytes)"),
            (raw_safetensors(r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#, &[0; 16]),
             "model.safetensors: invalid header: data offsets of tensor `b` overlap the previous tensor or leave a gap before it"),
            (raw_safetensors(r#"{"a":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}}"#, &[0; 16]),
             "model.safetensors: invalid header: tensor `a` has data offsets [0, 16] (16 bytes), but shape [3, 2] of F32 needs 24 bytes"),
            (raw_safetensors("{not json", &[]), "model.safetensors: invalid header: header is not valid safetensors JSON"),
        ];
        for (bytes, want) in cases {
            let dir = folder_with(&[("model.safetensors", bytes)]);
            let e = open_err(dir.path());
            assert!(e.contains(want), "got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(open_err(dir.path()), format!("missing config.json in {}", dir.path().display()));
        fs::write(dir.path().join("config.json"), TINY_CONFIG).unwrap();
        assert!(open_err(dir.path()).starts_with("no weights in "));
        fs::write(dir.path().join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
        assert!(open_err(dir.path()).contains("unknown model_type `bert`"));
    }

    fn write_shards(dir: &Path, index: &str) {
        let one = raw_safetensors(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &f32_bytes(&[1.0, 2.0]));
        let two = raw_safetensors(
            r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"extra":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &f32_bytes(&[3.0, 4.0]),
        );
        fs::write(dir.join("model-00001-of-00002.safetensors"), one).unwrap();
        fs::write(dir.join("model-00002-of-00002.safetensors"), two).unwrap();
        fs::write(dir.join(SAFETENSORS_INDEX_FILE), index).unwrap();
    }

    #[test]
    fn sharded() {
        let dir = folder_with(&[]);
        write_shards(
            dir.path(),
            r#"{"metadata": {"total_size": 12}, "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors"}}"#,
        );
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.tensor_names(), vec!["a", "b", "extra"]);
        assert_eq!(c.weight_files(), vec!["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        let b = c.get("b").unwrap();
        assert_eq!(b.file, "model-00002-of-00002.safetensors");
        assert_eq!(b.to_f32_vec().unwrap(), vec![3.0]);
        assert_eq!(c.get("a").unwrap().to_f32_vec().unwrap(), vec![1.0, 2.0]);
        assert_eq!(
            c.get("zzz").unwrap_err().to_string(),
            "tensor `zzz` missing from checkpoint (searched model-00001-of-00002.safetensors, \
             model-00002-of-00002.safetensors)"
        );
    }

    #[test]
    fn sharded_errors() {
        let cases = [
            (
                r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00003-of-00003.safetensors"}}"#,
                "shard `model-00003-of-00003.safetensors` (holding tensor `c`) does not exist in",
            ),
            (
                r#"{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}"#,
                "shard `../model-00001-of-00002.safetensors` is outside the checkpoint folder",
            ),
            (r#"{"weight_map": {"a": "/etc/passwd"}}"#, "shard `/etc/passwd` is outside the checkpoint folder"),
            (
                r#"{"weight_map": {"b": "model-00001-of-00002.safetensors"}}"#,
                "tensor `b` is mapped to shard `model-00001-of-00002.safetensors`, which does not contain it",
            ),
            (r#"{"metadata": {}}"#, "model.safetensors.index.json: key `weight_map` missing"),
            (r#"{"weight_map": [1]}"#, "key `weight_map` is [1] (a list), expected an object"),
            (r#"{"weight_map": {"a": 3}}"#, "key `weight_map.a` is 3, expected a shard file name"),
            ("{\n\"weight_map\": {,}}", "model.safetensors.index.json: malformed JSON at line 2 column 16"),
        ];
        for (index, want) in cases {
            let dir = folder_with(&[]);
            write_shards(dir.path(), index);
            let e = open_err(dir.path());
            assert!(e.contains(want), "got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn fixtures_open() {
        let root = Path::new(FIXTURES);
        if !root.is_dir() {
            eprintln!("skipping fixtures_open: {FIXTURES} does not exist");
            return;
        }
        for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-gemma", "tiny-phi3"] {
            let c = Checkpoint::open(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let cfg = c.config().clone();
            let h = cfg.hidden_size;
            let t = c.expect("model.embed_tokens.weight", &[cfg.vocab_size, h], "vocab_size x hidden_size").unwrap();
            assert_eq!(t.to_f32_vec().unwrap().len(), cfg.vocab_size * h);
            let kv_rows = cfg.num_key_value_heads * cfg.head_dim;
            if cfg.arch.fused_projections() {
                let rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
                c.expect("model.layers.0.self_attn.qkv_proj.weight", &[rows, h], "qkv rows").unwrap();
            } else {
                c.expect("model.layers.1.self_attn.k_proj.weight", &[kv_rows, h], "kv rows").unwrap();
            }
            assert_eq!(c.contains("lm_head.weight"), !cfg.tie_word_embeddings, "{name}");
        }
    }
}
