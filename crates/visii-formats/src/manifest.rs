//! A weight pack's `manifest.json`: the pack's format, and for every file of the pack (weight
//! shards, configs, tokenizer files, sharded indexes) its size and sha256. Loading a pack checks
//! every small file it reads against this list, so an edited config or index is refused, not used.

use std::collections::HashMap;

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
    let files = raw.files.ok_or("manifest.json lists no checksums for the pack's configs (a pack made by an older visii): convert the model again")?;
    let mut out = HashMap::new();
    for f in raw.shards.into_iter().chain(files) {
        crate::files::check_relative(&f.path).map_err(|e| format!("manifest.json: {e}"))?;
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("manifest.json: the sha256 of {} is not 64 hex digits", crate::text::printable_short(&f.path, 120)));
        }
        out.insert(f.path.clone(), FileEntry { sha256: f.sha256.to_ascii_lowercase(), ..f });
    }
    Ok(Manifest { files: out })
}

impl Manifest {
    /// Check a file's bytes against its entry; every file a pack's loader reads must be listed.
    pub fn verify(&self, rel: &str, bytes: &[u8]) -> Result<(), String> {
        let e = self.files.get(rel).ok_or_else(|| format!("{} is not listed in the pack's manifest.json", crate::text::printable_short(rel, 120)))?;
        if e.bytes != bytes.len() as u64 || sha256_hex(bytes) != e.sha256 {
            return Err(format!("{} does not match the checksum in the pack's manifest.json (edited or corrupt): convert or download the pack again", rel));
        }
        Ok(())
    }

    /// A listed file's size (weight shards are checked by size when opened; their sha256 when downloaded).
    pub fn size_of(&self, rel: &str) -> Option<u64> {
        self.files.get(rel).map(|e| e.bytes)
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
}
