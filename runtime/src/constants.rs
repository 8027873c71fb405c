//! Writing the constants file of a compiled plan (the weights its `Weight`
//! buffers point into) as it is built.
//!
//! A compiler appends each constant at an aligned offset; with
//! [`ConstantsWriter::create`] a background thread hashes (sha256, for the
//! manifest) and writes the bytes while the compiler goes on, so the file
//! is never held in memory whole and hashing costs no pass of its own. The
//! finished file is a [`FileData::File`], which the artifact writer moves
//! into the artifact (it never re-reads or re-hashes it).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::thread::JoinHandle;

use sha2::Digest;

use crate::artifact::{sha256_hex, ArtifactError, FileHasher, PIECE_BYTES};

/// The contents of one artifact file.
#[derive(Debug, Clone, PartialEq)]
pub enum FileData {
    /// Bytes in memory, written (and hashed) with the artifact.
    Bytes(Vec<u8>),
    /// A finished file, moved into the artifact; its size, sha256 and
    /// pieces' sha256 (see [`crate::artifact::FileEntry::pieces`]) were
    /// computed as it was written.
    File { path: PathBuf, size: u64, sha256: String, pieces: Vec<String> },
}

impl FileData {
    /// The size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            FileData::Bytes(b) => b.len() as u64,
            FileData::File { size, .. } => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hex sha256 of the contents.
    pub fn sha256(&self) -> String {
        match self {
            FileData::Bytes(b) => sha256_hex(b),
            FileData::File { sha256, .. } => sha256.clone(),
        }
    }

    /// Whether both have the same contents (by sha256 where one is a file).
    pub fn same_contents(&self, other: &FileData) -> bool {
        match (self, other) {
            (FileData::Bytes(a), FileData::Bytes(b)) => a == b,
            _ => self.len() == other.len() && self.sha256() == other.sha256(),
        }
    }

    /// The bytes, read from the file if it is one (tests, small files).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            FileData::Bytes(b) => Ok(b.clone()),
            FileData::File { path, .. } => std::fs::read(path),
        }
    }
}

/// What the writer thread is sent.
enum Msg {
    Data(Box<dyn AsRef<[u8]> + Send>),
    Zeros(usize),
    /// Everything sent before is in the file (for reading back).
    Sync(Sender<()>),
}

/// Chunks in flight between the compiler and the writer thread: enough to
/// keep both busy, few enough that memory stays near one chunk each.
const QUEUE: usize = 2;

/// Above this many bytes a chunk is hashed on threads of its own (the
/// whole file's hash and its pieces') while it is written: with 4 MiB,
/// smollm2-135m's 1.3 MB weights were hashed twice in turn on the writer
/// thread, which the compile then waited for (2.1-2.4 s against 1.9-2.2 s).
const SPLIT_HASH: usize = 1 << 20;

/// A constants file being built; see the module docs.
pub struct ConstantsWriter {
    len: u64,
    sink: Sink,
}

enum Sink {
    Memory(Vec<u8>),
    File {
        path: PathBuf,
        /// `None` once the writer thread stopped (it failed; `finish` says why).
        tx: Option<SyncSender<Msg>>,
        thread: JoinHandle<std::io::Result<(String, Vec<String>)>>,
        reader: File,
    },
}

impl ConstantsWriter {
    /// Keeps the file in memory (small artifacts, tests).
    pub fn in_memory() -> ConstantsWriter {
        ConstantsWriter { len: 0, sink: Sink::Memory(Vec::new()) }
    }

    /// Writes the file at `path` (created or truncated) from a background
    /// thread.
    pub fn create(path: &Path) -> Result<ConstantsWriter, ArtifactError> {
        let io = |source| ArtifactError::Io { path: path.to_path_buf(), source };
        let file = File::create(path).map_err(io)?;
        let reader = File::open(path).map_err(io)?;
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("smelt-constants".into())
            .spawn(move || {
                let mut file = BlockFile::new(file);
                let mut hasher = FileHasher::new(PIECE_BYTES);
                for msg in rx {
                    match msg {
                        Msg::Data(data) => hash_and_write(&mut hasher, &mut file, (*data).as_ref())?,
                        Msg::Zeros(n) => hash_and_write(&mut hasher, &mut file, &vec![0u8; n])?,
                        Msg::Sync(ack) => {
                            file.sync()?;
                            let _ = ack.send(());
                        }
                    }
                }
                file.sync()?;
                Ok(hasher.finish())
            })
            .map_err(io)?;
        Ok(ConstantsWriter { len: 0, sink: Sink::File { path: path.to_path_buf(), tx: Some(tx), thread, reader } })
    }

    /// The file's length so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data` at the next multiple of `align` (zeros in between)
    /// and returns its offset. A write error is reported by
    /// [`ConstantsWriter::finish`].
    pub fn append(&mut self, data: Box<dyn AsRef<[u8]> + Send>, align: usize) -> u64 {
        let offset = self.len.next_multiple_of(align.max(1) as u64);
        let pad = (offset - self.len) as usize;
        let n = (*data).as_ref().len() as u64;
        match &mut self.sink {
            Sink::Memory(v) => {
                v.resize(v.len() + pad, 0);
                v.extend_from_slice((*data).as_ref());
            }
            Sink::File { tx, .. } => {
                let sent = |tx: &SyncSender<Msg>| {
                    (pad == 0 || tx.send(Msg::Zeros(pad)).is_ok()) && (n == 0 || tx.send(Msg::Data(data)).is_ok())
                };
                if !tx.as_ref().is_some_and(sent) {
                    *tx = None;
                }
            }
        }
        self.len = offset + n;
        offset
    }

    /// Whether the `bytes.len()` bytes at `offset` (appended before) equal
    /// `bytes`; false where they cannot be read.
    pub fn matches(&mut self, offset: u64, bytes: &[u8]) -> bool {
        if offset + bytes.len() as u64 > self.len {
            return false;
        }
        match &mut self.sink {
            Sink::Memory(v) => &v[offset as usize..offset as usize + bytes.len()] == bytes,
            Sink::File { tx, reader, .. } => {
                let Some(sender) = tx.as_ref() else { return false };
                let (ack, done) = channel();
                if sender.send(Msg::Sync(ack)).is_err() || done.recv().is_err() {
                    *tx = None;
                    return false;
                }
                let mut buf = vec![0u8; (1 << 20).min(bytes.len())];
                for (i, want) in bytes.chunks(buf.len().max(1)).enumerate() {
                    let got = &mut buf[..want.len()];
                    let at = offset + (i * (1 << 20)) as u64;
                    if read_at(reader, got, at).is_err() || got != want {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Waits for the writer and returns the file.
    pub fn finish(self) -> Result<FileData, ArtifactError> {
        match self.sink {
            Sink::Memory(v) => Ok(FileData::Bytes(v)),
            Sink::File { path, tx, thread, .. } => {
                drop(tx);
                let io = |source| ArtifactError::Io { path: path.clone(), source };
                let (sha256, pieces) = match thread.join() {
                    Ok(r) => r.map_err(io)?,
                    Err(_) => return Err(io(std::io::Error::other("the constants writer thread panicked"))),
                };
                let size = std::fs::metadata(&path).map_err(io)?.len();
                if size != self.len {
                    let msg = format!("wrote {size} bytes, expected {}", self.len);
                    return Err(io(std::io::Error::other(msg)));
                }
                Ok(FileData::File { path, size, sha256, pieces })
            }
        }
    }
}

/// The size and alignment of the blocks [`BlockFile`] writes: a 2 MiB
/// huge page.
const BLOCK: usize = 2 << 20;

/// The constants file, written in whole blocks of [`BLOCK`] bytes at
/// offsets that are multiples of it (and the last, short one at the end).
///
/// The weights are read through a memory mapping, and how much of it the
/// kernel maps in 2 MiB pages follows the page cache's folios, which
/// follow the writes that made them: a file written a tensor at a time
/// (most of a small model's tensors under 2 MiB) was mapped 20% (bf16
/// smollm2-135m) or 46% (f32) in huge pages, and streaming from 4 KiB
/// pages is slower on machines where the page walks are costly (virtual
/// machines: see BENCHMARKS.md). Whole aligned blocks let the page cache
/// hold them as huge folios.
struct BlockFile {
    file: File,
    /// The bytes after the last whole block written.
    tail: Vec<u8>,
    /// Where `tail` starts in the file (a multiple of `BLOCK`).
    at: u64,
}

impl BlockFile {
    fn new(file: File) -> BlockFile {
        BlockFile { file, tail: Vec::with_capacity(BLOCK), at: 0 }
    }

    fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        if !self.tail.is_empty() {
            let take = (BLOCK - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() < BLOCK {
                return Ok(());
            }
            write_at(&self.file, &self.tail, self.at)?;
            self.at += BLOCK as u64;
            self.tail.clear();
        }
        let whole = data.len() / BLOCK * BLOCK;
        if whole > 0 {
            write_at(&self.file, &data[..whole], self.at)?;
            self.at += whole as u64;
        }
        self.tail.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Puts every byte given so far in the file; the short last block is
    /// written again, whole, once it fills.
    fn sync(&mut self) -> std::io::Result<()> {
        write_at(&self.file, &self.tail, self.at)
    }
}

/// Hashes (the whole file's hash and its pieces', each on a thread of
/// its own for a large chunk) and writes `data`.
fn hash_and_write(hasher: &mut FileHasher, file: &mut BlockFile, data: &[u8]) -> std::io::Result<()> {
    if data.len() < SPLIT_HASH {
        hasher.update(data);
        return file.write_all(data);
    }
    let FileHasher { whole, pieces } = hasher;
    std::thread::scope(|s| {
        s.spawn(|| whole.update(data));
        s.spawn(|| pieces.update(data));
        file.write_all(data)
    })
}

#[cfg(unix)]
fn write_at(f: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, offset)
}

#[cfg(not(unix))]
fn write_at(f: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(buf)
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(w: &mut ConstantsWriter) -> Vec<u64> {
        let big: Vec<u8> = (0..SPLIT_HASH + 77).map(|i| (i % 251) as u8).collect();
        vec![
            w.append(Box::new(vec![1u8, 2, 3]), 64),
            w.append(Box::new(big), 64),
            w.append(Box::new(Vec::<u8>::new()), 64),
            w.append(Box::new(vec![9u8; 5]), 64),
        ]
    }

    #[test]
    fn file_and_memory_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = ConstantsWriter::in_memory();
        let mut f = ConstantsWriter::create(&dir.path().join("c.bin")).unwrap();
        let offsets = fill(&mut m);
        assert_eq!(fill(&mut f), offsets);
        assert_eq!(offsets[..2], [0, 64]);
        assert!(offsets.iter().all(|o| o % 64 == 0));
        for w in [&mut m, &mut f] {
            assert!(w.matches(offsets[3], &[9; 5]) && !w.matches(offsets[3], &[9, 9, 9, 9, 8]));
            assert!(w.matches(64 + 5, &[5, 6, 7]) && !w.matches(offsets[3], &[9; 6]));
        }
        // Appending after reading back still works.
        m.append(Box::new(vec![7u8]), 1);
        f.append(Box::new(vec![7u8]), 1);
        let (m, f) = (m.finish().unwrap(), f.finish().unwrap());
        let bytes = f.read().unwrap();
        assert_eq!(FileData::Bytes(bytes.clone()), m);
        assert!(
            matches!(&f, FileData::File { size, sha256, .. } if *size == bytes.len() as u64 && *sha256 == sha256_hex(&bytes))
        );
        assert!(f.same_contents(&m) && m.same_contents(&f));
    }

    /// Chunks that start, end and straddle `BLOCK` boundaries, one larger
    /// than two blocks, and a read-back in the middle of a block (which
    /// writes the short block, later written again whole): the file has
    /// every byte where the in-memory writer has it.
    #[test]
    fn blocks_hold_the_bytes_across_their_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = ConstantsWriter::in_memory();
        let mut f = ConstantsWriter::create(&dir.path().join("c.bin")).unwrap();
        let bytes = |n: usize, seed: usize| -> Vec<u8> { (0..n).map(|i| ((i * 7 + seed) % 253) as u8).collect() };
        let sizes = [BLOCK - 3, 5, 2 * BLOCK + 11, 1, BLOCK, 0, 3 * BLOCK - 64];
        for (i, &n) in sizes.iter().enumerate() {
            for w in [&mut m, &mut f] {
                let o = w.append(Box::new(bytes(n, i)), 64);
                if i == 3 {
                    assert!(w.matches(o, &bytes(n, i)));
                }
            }
        }
        let (m, f) = (m.finish().unwrap(), f.finish().unwrap());
        assert_eq!(f.len(), m.len());
        assert!(f.read().unwrap() == m.read().unwrap(), "the file differs from the bytes appended");
        assert!(f.same_contents(&m));
    }

    #[test]
    fn create_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/c.bin");
        let e = ConstantsWriter::create(&missing).err().unwrap().to_string();
        assert!(e.contains("no/such/dir/c.bin"), "{e}");
    }
}
