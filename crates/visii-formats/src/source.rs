//! Byte sources read by range: a model file is never read whole. A safetensors file is opened by
//! reading its header; each tensor's bytes are read when the tensor is loaded, converted, sent to
//! the device and dropped. So loading holds at most one tensor on the host (the browser's wasm heap
//! cannot hold a 1.7 GB fp16 UNet, let alone twice).
//!
//! Sources: bytes in memory (tests, small files), a file on disk (the CLI), and in the browser a
//! `Blob` / OPFS `File` read with `FileReaderSync` in the worker (visii-web).

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Random-access bytes.
pub trait ByteSource: Send + Sync {
    /// Total size in bytes.
    fn len(&self) -> u64;
    /// `len` bytes from `offset` (the range lies within `self.len()`).
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ByteSource for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let a = usize::try_from(offset).map_err(|e| e.to_string())?;
        self.get(a..a.saturating_add(len)).map(<[u8]>::to_vec).ok_or_else(|| format!("range {a}+{len} is past the end ({} bytes)", <[u8]>::len(self)))
    }
}

impl ByteSource for Arc<[u8]> {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        (&**self).read_at(offset, len)
    }
}

/// A file on disk, read by seeking.
pub struct DiskFile {
    file: Mutex<std::fs::File>,
    len: u64,
}

impl DiskFile {
    /// Open a regular file (see [`crate::files::open_regular`]: pipes, devices and folders are refused).
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = crate::files::open_regular(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file: Mutex::new(file), len })
    }
}

impl ByteSource for DiskFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(format!("range {offset}+{len} is past the end ({} bytes)", self.len));
        }
        let mut f = self.file.lock().map_err(|_| "file lock poisoned".to_string())?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// Process-wide counters of tensor reads (`WeightFile::raw`) (bytes in total and the largest single read), so tests
/// and benchmarks can show that loading never held more than one tensor at a time.
pub struct ReadStats {
    total: AtomicU64,
    largest: AtomicU64,
}

pub static READ_STATS: ReadStats = ReadStats { total: AtomicU64::new(0), largest: AtomicU64::new(0) };

impl ReadStats {
    pub fn record(&self, len: usize) {
        self.total.fetch_add(len as u64, Ordering::Relaxed);
        self.largest.fetch_max(len as u64, Ordering::Relaxed);
    }
    /// (total bytes read, largest single read) since the last reset.
    pub fn get(&self) -> (u64, u64) {
        (self.total.load(Ordering::Relaxed), self.largest.load(Ordering::Relaxed))
    }
    pub fn reset(&self) {
        self.total.store(0, Ordering::Relaxed);
        self.largest.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_refused_before_seeking() {
        let path = std::env::temp_dir().join(format!("visii-source-{}.bin", std::process::id()));
        std::fs::write(&path, [1u8, 2, 3, 4, 5]).unwrap();
        let f = DiskFile::open(&path).unwrap();
        assert_eq!(f.read_at(1, 3).unwrap(), [2, 3, 4]);
        // An offset no seek can reach (a zip64 locator's 2^64 - 1) gets the same message as any
        // other range past the end, not the seek's "Invalid argument".
        for (offset, len) in [(u64::MAX, 4), (u64::MAX - 1, 0), (3, 3), (6, 0)] {
            let e = f.read_at(offset, len).unwrap_err();
            assert!(e.contains("past the end"), "{offset}+{len}: {e}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
