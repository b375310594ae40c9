//! A weight pack's `manifest.json`: the pack's format, and for every file of the pack (weight
//! shards, configs, tokenizer files, sharded indexes) its size and sha256. Loading a pack checks
//! every small file it reads against this list, so an edited config or index is refused, not used.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use crate::source::ByteSource;

use sha2::Digest;

pub const FORMAT: &str = "visii-pack";
/// A manifest larger than this is not one (a full pack's lists a few thousand tensors: ~1 MB).
pub const MAX_BYTES: u64 = 32 << 20;

/// One listed file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The checksums of a pack's files, by pack-relative path.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub files: HashMap<String, FileEntry>,
    /// Which of `files` are weight shards (the rest are small: configs, indexes, tokenizer files).
    pub shards: std::collections::HashSet<String>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether JSON text is a pack manifest (its `format` says so), without validating the rest.
pub fn is_manifest(text: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        format: Option<String>,
    }
    serde_json::from_slice::<Probe>(text).ok().and_then(|p| p.format).as_deref() == Some(FORMAT)
}

/// Parse and validate a manifest: its `shards` (weight files) and `files` (everything else).
pub fn parse(text: &[u8]) -> Result<Manifest, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        format: String,
        #[serde(default)]
        shards: Vec<FileEntry>,
        #[serde(default)]
        files: Option<Vec<FileEntry>>,
    }
    if text.len() as u64 > MAX_BYTES {
        return Err(format!("manifest.json has {} bytes, more than a manifest may have", text.len()));
    }
    let raw: Raw = serde_json::from_slice(text).map_err(|e| format!("manifest.json is not a pack manifest ({e})"))?;
    if raw.format != FORMAT {
        return Err(format!("manifest.json's format is {:?}, not {FORMAT:?}", crate::text::printable_short(&raw.format, 40)));
    }
    let files =
        raw.files.ok_or("manifest.json lists no checksums for the pack's configs (a pack made by an older visii): convert the model again")?;
    let mut out = HashMap::new();
    let shards = raw.shards.iter().map(|f| f.path.clone()).collect();
    for f in raw.shards.into_iter().chain(files) {
        crate::files::check_relative(&f.path).map_err(|e| format!("manifest.json: {e}"))?;
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("manifest.json: the sha256 of {} is not 64 hex digits", crate::text::printable_short(&f.path, 120)));
        }
        out.insert(f.path.clone(), FileEntry { sha256: f.sha256.to_ascii_lowercase(), ..f });
    }
    Ok(Manifest { files: out, shards })
}

impl Manifest {
    /// Check a file's bytes against its entry; every file a pack's loader reads must be listed.
    pub fn verify(&self, rel: &str, bytes: &[u8]) -> Result<(), String> {
        let e = self.files.get(rel).ok_or_else(|| format!("{} is not listed in the pack's manifest.json", crate::text::printable_short(rel, 120)))?;
        if e.bytes != bytes.len() as u64 || sha256_hex(bytes) != e.sha256 {
            return Err(format!(
                "{} does not match the checksum in the pack's manifest.json (edited or corrupt): convert or download the pack again",
                rel
            ));
        }
        Ok(())
    }

    /// The listed files that are not weight shards, under `prefix`, by name within it.
    pub fn small_files<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let mut v: Vec<&str> = self.files.keys().filter(|k| !self.shards.contains(*k)).filter_map(|k| k.strip_prefix(prefix)).collect();
        v.sort_unstable();
        v.into_iter()
    }

    /// A listed file's size.
    pub fn size_of(&self, rel: &str) -> Option<u64> {
        self.files.get(rel).map(|e| e.bytes)
    }

    /// A weight shard read through its checksum: its size is checked now, its sha256 on the first
    /// read (the whole file, in slices, once), before any of its bytes are used.
    pub fn verified(&self, rel: &str, inner: Arc<dyn ByteSource>) -> Result<Verified, String> {
        let e = self.files.get(rel).ok_or_else(|| "not listed in the pack's manifest.json".to_string())?;
        if e.bytes != inner.len() {
            return Err(format!(
                "{} bytes where the pack's manifest.json lists {} (edited or truncated): download or convert the pack again",
                inner.len(),
                e.bytes
            ));
        }
        Ok(Verified { inner, sha256: e.sha256.clone(), checked: OnceLock::new() })
    }
}

/// A pack file whose bytes are used only once they match the manifest's sha256 (see
/// [`Manifest::verified`]).
pub struct Verified {
    inner: Arc<dyn ByteSource>,
    sha256: String,
    checked: OnceLock<Result<(), String>>,
}

/// How much of a file is hashed at a time.
const HASH_SLICE: usize = 8 << 20;

impl Verified {
    fn check(&self) -> Result<(), String> {
        self.checked
            .get_or_init(|| {
                let mut h = sha2::Sha256::new();
                let mut at = 0u64;
                while at < self.inner.len() {
                    let n = (self.inner.len() - at).min(HASH_SLICE as u64) as usize;
                    h.update(self.inner.read_at(at, n)?);
                    at += n as u64;
                }
                let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                if digest != self.sha256 {
                    return Err(
                        "does not match the checksum in the pack's manifest.json (edited or corrupt): convert or download the pack again".into()
                    );
                }
                Ok(())
            })
            .clone()
    }
}

impl ByteSource for Verified {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.check()?;
        self.inner.read_at(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edited_unlisted_and_escaping_files_are_refused() {
        let cfg = br#"{"a":1}"#;
        let m = serde_json::json!({"format": FORMAT, "shards": [], "files": [{"path": "unet/config.json", "bytes": cfg.len(), "sha256": sha256_hex(cfg)}]});
        let m = parse(m.to_string().as_bytes()).unwrap();
        m.verify("unet/config.json", cfg).unwrap();
        assert!(m.verify("unet/config.json", br#"{"a":2}"#).unwrap_err().contains("checksum"));
        assert!(m.verify("vae/config.json", cfg).unwrap_err().contains("not listed"));
        let old = serde_json::json!({"format": FORMAT, "shards": []});
        assert!(parse(old.to_string().as_bytes()).unwrap_err().contains("older"));
        let out = serde_json::json!({"format": FORMAT, "files": [{"path": "../x", "bytes": 1, "sha256": "0".repeat(64)}]});
        assert!(parse(out.to_string().as_bytes()).unwrap_err().contains("outside"));
    }

    #[test]
    fn shards_are_read_only_once_their_checksum_matches() {
        let shard: Arc<[u8]> = (0..(HASH_SLICE + 1000)).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        let m = serde_json::json!({"format": FORMAT, "shards": [{"path": "unet/a.safetensors", "bytes": shard.len(), "sha256": sha256_hex(&shard)}], "files": []});
        let m = parse(m.to_string().as_bytes()).unwrap();
        let v = m.verified("unet/a.safetensors", Arc::new(shard.clone())).unwrap();
        assert_eq!(v.read_at(HASH_SLICE as u64 - 2, 4).unwrap(), shard[HASH_SLICE - 2..HASH_SLICE + 2].to_vec());
        let mut flipped = shard.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        let v = m.verified("unet/a.safetensors", Arc::new(Arc::<[u8]>::from(flipped))).unwrap();
        assert!(v.read_at(0, 8).unwrap_err().contains("checksum"), "the first read, far from the flipped byte, is refused");
        assert!(v.read_at(0, 8).unwrap_err().contains("checksum"), "and every later one");
        assert!(m.verified("unet/a.safetensors", Arc::new(Arc::<[u8]>::from(&shard[1..]))).err().unwrap().contains("bytes where"));
        assert!(m.verified("unet/b.safetensors", Arc::new(shard)).err().unwrap().contains("not listed"));
    }
}
