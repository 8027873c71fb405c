//! Errors of the Hugging Face frontend.
//!
//! Every message is one line that names what was wrong and where: the file,
//! the JSON key or the tensor, and what was expected next to what was found.
//! Paths are printed as the caller gave them, so a message about a checkpoint
//! opened as `models/tiny` reads `models/tiny/config.json: ...`.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a Hugging Face
/// checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// The folder has no `config.json`.
    #[error("missing config.json in {}", dir.display())]
    MissingConfig { dir: PathBuf },

    /// The folder has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )]
    MissingWeights { dir: PathBuf },

    /// A file could not be read, written or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file does not parse.
    #[error("{file}: malformed JSON at line {line} column {column}: {msg}")]
    Json { file: String, line: usize, column: usize, msg: String },

    /// A required JSON key is absent (or null).
    #[error("{file}: key `{key}` missing")]
    MissingKey { file: String, key: String },

    /// A JSON key holds a value of the wrong kind or out of range.
    #[error("{file}: key `{key}` is {found}, expected {expected}")]
    BadValue { file: String, key: String, found: String, expected: String },

    /// `model_type` names an architecture this frontend does not build.
    #[error("{file}: unknown model_type `{found}` (supported: {})", supported.join(", "))]
    UnknownModelType { file: String, found: String, supported: Vec<&'static str> },

    /// The rope type (`rope_parameters.rope_type`, `rope_scaling.type`, ...) is unknown.
    #[error("{file}: key `{key}` is `{found}`, an unknown rope type (supported: {})", supported.join(", "))]
    UnknownRopeType { file: String, key: String, found: String, supported: Vec<&'static str> },

    /// Values that are fine one by one but inconsistent together (sizes that do
    /// not divide, a rotary dimension larger than the head, ...).
    #[error("{file}: {msg}")]
    InvalidConfig { file: String, msg: String },

    /// A safetensors file whose header cannot be trusted: truncated file,
    /// header length beyond the file, offsets beyond the data, overlapping or
    /// lying offsets.
    #[error("{file}: invalid header: {msg}")]
    SafetensorsHeader { file: String, msg: String },

    /// `model.safetensors.index.json` names a shard that is not there.
    #[error("{index}: shard `{shard}` (holding tensor `{tensor}`) does not exist in {}", dir.display())]
    MissingShard { index: String, shard: String, tensor: String, dir: PathBuf },

    /// `model.safetensors.index.json` names a shard outside the checkpoint folder.
    #[error("{index}: shard `{shard}` is outside the checkpoint folder (only plain relative file names are allowed)")]
    ShardOutsideDir { index: String, shard: String },

    /// The index maps a tensor to a shard whose header does not list it.
    #[error("{index}: tensor `{tensor}` is mapped to shard `{shard}`, which does not contain it")]
    TensorNotInShard { index: String, tensor: String, shard: String },

    /// A tensor the model needs is not in any weight file.
    #[error("tensor `{name}` missing from checkpoint (searched {})", searched.join(", "))]
    MissingTensor { name: String, searched: Vec<String> },

    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} ({why})")]
    ShapeMismatch { name: String, found: Vec<usize>, expected: Vec<usize>, why: String },

    /// A tensor has a dtype the caller cannot use (an integer where weights
    /// must be floating point, ...).
    #[error("tensor `{name}` has dtype {found}, expected {expected}")]
    WrongDType { name: String, found: String, expected: String },

    /// A tensor is stored in a safetensors dtype smelt does not read
    /// (fp8, u16, complex, ...).
    #[error("{file}: tensor `{name}` has dtype {found}, which smelt does not read (supported: F32, F16, BF16, F64, I64, I32, I8, U8, BOOL)")]
    UnsupportedDType { file: String, name: String, found: String },

    /// A [`crate::hf::writer::RandomModelSpec`] that cannot be written.
    #[error("random model spec: {msg}")]
    InvalidSpec { msg: String },

    /// Serialising tensors to safetensors failed (a shape that overflows, ...).
    #[error("{}: cannot write safetensors: {msg}", path.display())]
    SafetensorsWrite { path: PathBuf, msg: String },
}

impl HfError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HfError::Io { path: path.into(), source }
    }

    /// Turns a serde_json parse error into a message that names the file and
    /// the position, so a user can open the file at the right line.
    pub(crate) fn json(file: impl Into<String>, err: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its Display; the position
        // is already in our message, so keep only the description.
        let text = err.to_string();
        let msg = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        HfError::Json { file: file.into(), line: err.line(), column: err.column(), msg }
    }

    pub(crate) fn bad_value(file: &str, key: &str, found: impl Into<String>, expected: impl Into<String>) -> Self {
        HfError::BadValue {
            file: file.to_string(),
            key: key.to_string(),
            found: found.into(),
            expected: expected.into(),
        }
    }

    pub(crate) fn invalid(file: &str, msg: impl Into<String>) -> Self {
        HfError::InvalidConfig { file: file.to_string(), msg: msg.into() }
    }
}

/// Describes a JSON value briefly for "found" in messages: the value itself
/// when short, else its kind.
pub(crate) fn describe_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let kind = match v {
        Value::Null => return "null".to_string(),
        Value::Bool(b) => return b.to_string(),
        Value::Number(n) => return n.to_string(),
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let text = v.to_string();
    if text.len() <= 40 {
        format!("{text} ({kind})")
    } else {
        kind.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_names_file_and_position() {
        let err = serde_json::from_str::<serde_json::Value>("{\n  \"a\": 1,\n    ]").unwrap_err();
        let e = HfError::json("config.json", &err);
        let msg = e.to_string();
        assert!(msg.starts_with("config.json: malformed JSON at line 3 column 5: "), "{msg}");
        assert!(!msg.contains(" at line 3 column 5 at line"), "{msg}");
    }

    #[test]
    fn shape_mismatch_message() {
        let e = HfError::ShapeMismatch {
            name: "model.layers.3.self_attn.k_proj.weight".into(),
            found: vec![128, 64],
            expected: vec![64, 64],
            why: "num_key_value_heads=2 x head_dim=32 rows from config.json".into(),
        };
        assert_eq!(
            e.to_string(),
            "tensor `model.layers.3.self_attn.k_proj.weight` has shape [128, 64], expected [64, 64] \
             (num_key_value_heads=2 x head_dim=32 rows from config.json)"
        );
    }

    #[test]
    fn describe_json_values() {
        assert_eq!(describe_json(&serde_json::json!(null)), "null");
        assert_eq!(describe_json(&serde_json::json!(-3)), "-3");
        assert_eq!(describe_json(&serde_json::json!("64")), "\"64\" (a string)");
        assert_eq!(describe_json(&serde_json::json!(vec![0; 40])), "a list");
    }
}
