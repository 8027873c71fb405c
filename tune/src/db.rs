//! The tuning database: one JSON file of measured winners.
//!
//! ```text
//! { "format": "smelt-tuning-db", "version": 1,
//!   "records": [ { "key": { "signature": "weight_product-3f0c...", "bucket": "m=1,128 threads=2",
//!                           "device": "cpu-9a1b..." },
//!                  "site": "weight_product n=960 k=576 act=none w=f32",
//!                  "params": "panels mr=4 nr=8 ksplit=4 fma=1 lanes=4 streams=2 prefetch=0 lowering=cranelift",
//!                  "default_params": "...", "timings": [ { "m": 1, "seconds": ..., ... } ],
//!                  "threads": 2, "device": "x86_64 | AMD EPYC ... | avx,avx2,fma",
//!                  "smelt_version": "0.1.0", "date": "2026-11-29T10:12:03Z", "unix_time": ... } ] }
//! ```
//!
//! A record is keyed by the kernel's signature (`smelt_codegen::tuning`:
//! its template, parameter domain and default kernels), the shape bucket
//! (the row counts it was timed at and the thread count) and the device
//! fingerprint ([`crate::device`]).
//!
//! Guarantees:
//! - reading never fails: a missing file is an empty database; an
//!   unreadable, truncated or garbage file, one of another format version,
//!   or a malformed record gives a [`Warning`] and is ignored (that record,
//!   or the whole file);
//! - writing ([`commit`]) holds an exclusive lock on `PATH.lock` while it
//!   re-reads the file, merges and replaces it by an atomic rename of a
//!   fully written temporary file, so concurrent tuners never lose each
//!   other's records and readers never see half a file; a corrupt file is
//!   moved aside to `PATH.corrupt` first, a file of another version is
//!   never overwritten ([`DbError::Foreign`]);
//! - merging keeps, per key, the most recently measured record.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use smelt_codegen::tuning::{Tuning, Variant};

/// The `format` field of every database file.
pub const FORMAT: &str = "smelt-tuning-db";
/// The format version this smelt reads and writes.
pub const VERSION: u64 = 1;

/// What a record is valid for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub signature: String,
    pub bucket: String,
    pub device: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.signature, self.bucket, self.device)
    }
}

/// The shape bucket of a measurement: the row counts it was timed at and
/// the thread count, `m=1,128 threads=2`.
pub fn bucket(rows: &[usize], threads: usize) -> String {
    let rows: Vec<String> = rows.iter().map(|m| m.to_string()).collect();
    format!("m={} threads={threads}", rows.join(","))
}

/// The shape bucket of a GPU record: `m=1,128 gpu`.
pub fn gpu_bucket(rows: &[usize]) -> String {
    let rows: Vec<String> = rows.iter().map(|m| m.to_string()).collect();
    format!("m={} gpu", rows.join(","))
}

/// One workload of a record: seconds per call with `m` rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub m: usize,
    /// The winner's median time.
    pub seconds: f64,
    /// The default (estimated) parameters' median time in the same run.
    pub default_seconds: f64,
    /// The roofline estimate: the larger of flops / FMA peak and bytes /
    /// read bandwidth.
    pub estimate_seconds: f64,
}

/// A measured winner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub key: Key,
    /// The kernel's site (`smelt_codegen::tuning::Site`).
    pub site: String,
    /// The winning variant (`smelt_codegen::tuning::Variant`).
    pub params: String,
    /// The variant a compile uses without this record.
    pub default_params: String,
    pub timings: Vec<Timing>,
    pub threads: usize,
    /// The device fingerprint's description (the key holds its hash).
    pub device: String,
    pub smelt_version: String,
    /// When it was measured, UTC, RFC 3339.
    pub date: String,
    pub unix_time: u64,
}

impl Record {
    /// The winner's parameters.
    pub fn variant(&self) -> Result<Variant, smelt_codegen::tuning::ParseError> {
        self.params.parse()
    }
}

/// A problem with a database file that was ignored.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Warning {
    #[error("tuning database {path}: cannot read it ({message}); ignoring it")]
    Unreadable { path: String, message: String },
    #[error("tuning database {path}: not a smelt tuning database ({message}); ignoring it")]
    Corrupt { path: String, message: String },
    #[error("tuning database {path}: format version {version}, this smelt reads version {VERSION}; ignoring it")]
    Foreign { path: String, version: u64 },
    #[error("tuning database {path}: record {index} is malformed ({message}); ignoring it")]
    BadRecord { path: String, index: usize, message: String },
    #[error("tuning database {path}: was corrupt; moved aside to {backup}")]
    MovedAside { path: String, backup: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("tuning database {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tuning database {}: format version {version}, this smelt writes version {VERSION}; not overwriting it (choose another file with --db)", path.display())]
    Foreign { path: PathBuf, version: u64 },
}

/// The file's layout.
#[derive(Serialize)]
struct FileOut<'a> {
    format: &'a str,
    version: u64,
    records: Vec<&'a Record>,
}

/// Records by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Db {
    records: BTreeMap<Key, Record>,
}

/// What reading a file found.
enum Read {
    Missing,
    Db(Db, Vec<Warning>),
    /// Ignored whole: unreadable or corrupt.
    Bad(Warning),
    Foreign(u64, Warning),
}

impl Db {
    pub fn new() -> Db {
        Db::default()
    }

    /// Reads the database at `path`; never fails (see the module docs).
    pub fn load(path: &Path) -> (Db, Vec<Warning>) {
        match read(path) {
            Read::Missing => (Db::new(), vec![]),
            Read::Db(db, w) => (db, w),
            Read::Bad(w) | Read::Foreign(_, w) => (Db::new(), vec![w]),
        }
    }

    /// Parses a database file's text; `path` names it in warnings.
    pub fn parse(text: &str, path: &str) -> (Db, Vec<Warning>) {
        match parse(text, path) {
            Ok(x) => x,
            Err((_, w)) => (Db::new(), vec![w]),
        }
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, key: &Key) -> Option<&Record> {
        self.records.get(key)
    }

    /// Adds `r` unless a record with its key was measured later; true when
    /// it was added.
    pub fn insert(&mut self, r: Record) -> bool {
        match self.records.get(&r.key) {
            Some(old) if old.unix_time > r.unix_time => false,
            _ => {
                self.records.insert(r.key.clone(), r);
                true
            }
        }
    }

    /// Inserts every record of `other`; returns how many were added.
    pub fn merge(&mut self, other: Db) -> usize {
        other.records.into_values().map(|r| self.insert(r) as usize).sum()
    }

    /// The file's text (records sorted by key, so equal databases are
    /// equal files).
    pub fn to_json(&self) -> String {
        let out = FileOut { format: FORMAT, version: VERSION, records: self.records.values().collect() };
        let mut s = serde_json::to_string_pretty(&out).expect("records serialise");
        s.push('\n');
        s
    }

    /// The winners for `device`: per signature the most recent record
    /// (then the greatest key, so the choice is deterministic). Records of
    /// other devices are not applied; a record whose parameters do not
    /// parse is skipped with a warning.
    pub fn tuning_for(&self, device: &str, path: &str) -> (Tuning, Vec<Warning>) {
        let mut best: BTreeMap<&str, &Record> = BTreeMap::new();
        for r in self.records.values().filter(|r| r.key.device == device) {
            let newer =
                best.get(r.key.signature.as_str()).is_none_or(|b| (r.unix_time, &r.key) > (b.unix_time, &b.key));
            if newer {
                best.insert(&r.key.signature, r);
            }
        }
        let mut tuning = Tuning::default();
        let mut warnings = vec![];
        for (i, (sig, r)) in best.into_iter().enumerate() {
            match r.variant() {
                Ok(v) => tuning.insert(sig, v, &r.key.to_string()),
                Err(e) => {
                    warnings.push(Warning::BadRecord { path: path.to_string(), index: i, message: e.to_string() })
                }
            }
        }
        (tuning, warnings)
    }
}

fn read(path: &Path) -> Read {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Read::Missing,
        Err(e) => Read::Bad(Warning::Unreadable { path: shown, message: e.to_string() }),
        Ok(bytes) => match String::from_utf8(bytes) {
            Err(_) => Read::Bad(Warning::Corrupt { path: shown, message: "not UTF-8 text".into() }),
            Ok(text) => match parse(&text, &shown) {
                Ok((db, w)) => Read::Db(db, w),
                Err((Some(v), w)) => Read::Foreign(v, w),
                Err((None, w)) => Read::Bad(w),
            },
        },
    }
}

/// The database in `text`, or the warning that rejects the whole file
/// (with the version when it is a foreign one).
fn parse(text: &str, path: &str) -> Result<(Db, Vec<Warning>), (Option<u64>, Warning)> {
    let corrupt = |message: String| (None, Warning::Corrupt { path: path.to_string(), message });
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| corrupt("not a JSON object".into()))?;
    match obj.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        Some(other) => return Err(corrupt(format!("format `{other}`"))),
        None => return Err(corrupt("no `format` field".into())),
    }
    let version = obj.get("version").and_then(|v| v.as_u64()).ok_or_else(|| corrupt("no `version` number".into()))?;
    if version != VERSION {
        return Err((Some(version), Warning::Foreign { path: path.to_string(), version }));
    }
    let records = obj.get("records").and_then(|r| r.as_array()).ok_or_else(|| corrupt("no `records` list".into()))?;
    let mut db = Db::new();
    let mut warnings = vec![];
    for (index, r) in records.iter().enumerate() {
        match serde_json::from_value::<Record>(r.clone()) {
            Ok(r) => {
                db.insert(r);
            }
            Err(e) => warnings.push(Warning::BadRecord { path: path.to_string(), index, message: e.to_string() }),
        }
    }
    Ok((db, warnings))
}

/// What [`commit`] did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Records added or replaced.
    pub added: usize,
    /// Records in the file afterwards.
    pub total: usize,
    pub warnings: Vec<Warning>,
}

/// Merges `records` into the database file at `path` (created with its
/// folder if missing) under the lock, replacing the file atomically.
pub fn commit(path: &Path, records: Vec<Record>) -> Result<Committed, DbError> {
    let mut db = Db::new();
    for r in records {
        db.insert(r);
    }
    update(path, |file| file.merge(db))
}

/// Runs `change` on the database at `path` under the lock and writes the
/// result atomically; `change` returns how many records it added.
pub fn update(path: &Path, change: impl FnOnce(&mut Db) -> usize) -> Result<Committed, DbError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| DbError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let lock_path = lock_path(path);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    let mut warnings = vec![];
    let mut db = match read(path) {
        Read::Missing => Db::new(),
        Read::Db(db, w) => {
            warnings.extend(w);
            db
        }
        Read::Foreign(version, _) => return Err(DbError::Foreign { path: path.to_path_buf(), version }),
        Read::Bad(w) => {
            warnings.push(w);
            let backup = PathBuf::from(format!("{}.corrupt", path.display()));
            if std::fs::rename(path, &backup).is_ok() {
                warnings.push(Warning::MovedAside {
                    path: path.display().to_string(),
                    backup: backup.display().to_string(),
                });
            }
            Db::new()
        }
    };
    let added = change(&mut db);
    let mut tmp = tempfile::Builder::new().prefix(".smelt-tuning-").tempfile_in(&dir).map_err(io(&dir))?;
    tmp.write_all(db.to_json().as_bytes()).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| DbError::Io { path: path.to_path_buf(), source: e.error })?;
    // The lock is released when `lock` is dropped, after the rename.
    drop(lock);
    Ok(Committed { added, total: db.len(), warnings })
}

/// The lock file beside a database.
pub fn lock_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", path.display()))
}

/// The default database: `$SMELT_TUNING_DB`, else `tuning.json` in the
/// user's cache folder (`$XDG_CACHE_HOME/smelt`, or `~/.cache/smelt`).
pub fn default_path() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("SMELT_TUNING_DB") {
        return Some(p);
    }
    let cache = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))?;
    Some(cache.join("smelt").join("tuning.json"))
}

/// Seconds since the Unix epoch and the same instant as RFC 3339 UTC.
pub fn now() -> (u64, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs, rfc3339(secs))
}

/// `2026-11-29T10:12:03Z` for a Unix time (proleptic Gregorian calendar).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(sig: &str, device: &str, params: &str, unix_time: u64) -> Record {
        Record {
            key: Key { signature: sig.into(), bucket: bucket(&[1, 128], 2), device: device.into() },
            site: "weight_product n=8 k=8 act=none w=f32".into(),
            params: params.into(),
            default_params: "panels mr=6 nr=8 ksplit=4 fma=0 lanes=4 streams=2 prefetch=0 lowering=cranelift".into(),
            timings: vec![Timing { m: 1, seconds: 1e-6, default_seconds: 2e-6, estimate_seconds: 5e-7 }],
            threads: 2,
            device: "test device".into(),
            smelt_version: "0.1.0".into(),
            date: rfc3339(unix_time),
            unix_time,
        }
    }

    const P1: &str = "panels mr=4 nr=8 ksplit=2 fma=1 lanes=4 streams=2 prefetch=0 lowering=cranelift";
    const P2: &str = "rows mr=2 nc=4 ksplit=2 lowering=cranelift";

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn round_trip_and_newest_wins() {
        let mut db = Db::new();
        assert!(db.insert(record("a", "d1", P1, 10)));
        assert!(!db.insert(record("a", "d1", P2, 5)), "an older measurement does not replace a newer one");
        assert!(db.insert(record("b", "d1", P2, 7)));
        let text = db.to_json();
        let (back, w) = Db::parse(&text, "t.json");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(back, db);
        assert_eq!(back.to_json(), text);
        assert_eq!(db.records().next().unwrap().params, P1);
    }

    #[test]
    fn garbage_truncated_and_foreign_files_are_ignored_with_a_warning() {
        let mut db = Db::new();
        db.insert(record("a", "d1", P1, 10));
        let text = db.to_json();
        let cases: Vec<(String, &str)> = vec![
            (text[..text.len() / 2].to_string(), "not a smelt tuning database"),
            ("\u{0}\u{1}garbage".to_string(), "not a smelt tuning database"),
            ("[1, 2]".to_string(), "not a JSON object"),
            (r#"{"format": "other", "version": 1, "records": []}"#.to_string(), "format `other`"),
            (text.replace("\"version\": 1", "\"version\": 7"), "format version 7"),
        ];
        for (t, want) in cases {
            let (db, w) = Db::parse(&t, "x.json");
            assert!(db.is_empty());
            assert_eq!(w.len(), 1, "{t}");
            assert!(w[0].to_string().contains(want) && w[0].to_string().contains("ignoring it"), "{}", w[0]);
        }
        // One malformed record costs only itself.
        let bad = text.replace("\"threads\": 2", "\"threads\": \"two\"");
        let mut two = Db::new();
        two.insert(record("b", "d1", P2, 1));
        let joined = bad.replace(
            "\"records\": [",
            &format!("\"records\": [{},", serde_json::to_string(two.records().next().unwrap()).unwrap()),
        );
        let (db, w) = Db::parse(&joined, "x.json");
        assert_eq!(db.len(), 1, "{joined}");
        assert!(matches!(w[..], [Warning::BadRecord { index: 1, .. }]), "{w:?}");
    }

    #[test]
    fn tuning_applies_only_this_devices_newest_records() {
        let mut db = Db::new();
        db.insert(record("a", "d1", P1, 10));
        db.insert(Record {
            key: Key { bucket: bucket(&[1, 64], 2), ..record("a", "d1", P2, 20).key },
            ..record("a", "d1", P2, 20)
        });
        db.insert(record("b", "d2", P1, 10));
        db.insert(record("c", "d1", "panels nonsense", 10));
        let (t, w) = db.tuning_for("d1", "x");
        assert_eq!(t.len(), 1);
        assert_eq!(t.get("a").unwrap().0, P2.parse().unwrap());
        assert!(t.get("a").unwrap().1.contains("m=1,64"));
        assert!(t.get("b").is_none(), "another device's record is not applied");
        assert_eq!(w.len(), 1, "{w:?}");
        let (t, _) = db.tuning_for("d3", "x");
        assert!(t.is_empty());
    }

    #[test]
    fn commit_merges_and_moves_a_corrupt_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("db.json");
        let c = commit(&path, vec![record("a", "d1", P1, 1)]).unwrap();
        assert_eq!((c.added, c.total), (1, 1));
        let c = commit(&path, vec![record("b", "d1", P1, 1)]).unwrap();
        assert_eq!((c.added, c.total), (1, 2));
        std::fs::write(&path, "{\"format\": \"smelt-tuning-db\", \"vers").unwrap();
        let (db, w) = Db::load(&path);
        assert!(db.is_empty() && w.len() == 1);
        let c = commit(&path, vec![record("c", "d1", P1, 1)]).unwrap();
        assert_eq!(c.total, 1);
        assert!(c.warnings.iter().any(|w| matches!(w, Warning::MovedAside { .. })), "{:?}", c.warnings);
        assert!(dir.path().join("sub").join("db.json.corrupt").exists());
        // A newer format's file is left alone.
        std::fs::write(&path, r#"{"format": "smelt-tuning-db", "version": 2, "records": []}"#).unwrap();
        let e = commit(&path, vec![record("d", "d1", P1, 1)]).unwrap_err();
        assert!(e.to_string().contains("not overwriting"), "{e}");
    }
}
