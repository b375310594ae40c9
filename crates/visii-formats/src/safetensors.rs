//! The safetensors header, validated as hostile input: its length, its JSON, every tensor's dtype,
//! shape (products checked, no overflow) and byte range (inside the data, exactly the size its
//! dtype and shape need, no two tensors overlapping) and the metadata (strings only). Each refusal
//! keeps its reason ("truncated", "header too large", ...).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorInfo};

use crate::source::ByteSource;

/// Headers larger than this are refused: a real checkpoint's is a few hundred kB, and the JSON
/// parse costs a small multiple of it.
pub const MAX_HEADER: u64 = 16 << 20;

/// A parsed, validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Where the data section starts (8 + header length).
    pub data_start: u64,
    /// Tensors by name; `data_offsets` relative to `data_start`.
    pub tensors: HashMap<String, TensorInfo>,
    /// `__metadata__` (string to string, as the format defines it).
    pub metadata: HashMap<String, String>,
}

/// Elements of a shape, `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes a tensor of `dtype` and `shape` needs, `None` on overflow.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    numel(shape)?.checked_mul(dtype.bitsize()).map(|bits| bits.div_ceil(8))
}

/// Read and validate the header of a safetensors file.
pub fn read_header(source: &dyn ByteSource) -> Result<Header, String> {
    let len = source.len();
    if len < 8 {
        return Err(format!("the file has {len} bytes, fewer than the 8 of a header length (truncated?)"));
    }
    let n = u64::from_le_bytes(source.read_at(0, 8)?.try_into().map_err(|_| "short read")?);
    if n > MAX_HEADER {
        return Err(format!("the header claims {n} bytes, more than the {MAX_HEADER} a header may have"));
    }
    if 8 + n > len {
        return Err(format!("the header claims {n} bytes but the file has only {} after the length (truncated download?)", len - 8));
    }
    let header = source.read_at(8, n as usize)?;
    parse_header(&header, len - 8 - n).map(|(tensors, metadata)| Header { data_start: 8 + n, tensors, metadata })
}

/// Parse and validate header JSON for a data section of `data_len` bytes.
pub fn parse_header(header: &[u8], data_len: u64) -> Result<(HashMap<String, TensorInfo>, HashMap<String, String>), String> {
    if header.first() != Some(&b'{') {
        return Err("the header is not a JSON object (not safetensors data)".into());
    }
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("the header is not valid JSON ({e})"))?;
    let mut tensors = HashMap::new();
    let mut metadata = HashMap::new();
    for (k, v) in map {
        if k == "__metadata__" {
            let serde_json::Value::Object(m) = v else { return Err("`__metadata__` is not a map of strings".into()) };
            for (mk, mv) in m {
                let serde_json::Value::String(s) = mv else {
                    return Err(format!("metadata `{}` is not a string", crate::text::printable_short(&mk, 64)));
                };
                metadata.insert(mk, s);
            }
            continue;
        }
        let shown = crate::text::printable_short(&k, 120);
        let info: TensorInfo = serde_json::from_value(v).map_err(|e| format!("tensor `{shown}`: {e}"))?;
        let (a, b) = info.data_offsets;
        let need = byte_len(info.dtype, &info.shape).ok_or_else(|| format!("tensor `{shown}`: shape {:?} has too many elements", info.shape))?;
        if b < a || b as u64 > data_len || b - a != need {
            return Err(format!(
                "tensor `{shown}`: bytes {a}..{b} do not hold {:?} {:?} ({need} bytes) within the file's {data_len} data bytes (truncated download?)",
                info.dtype, info.shape
            ));
        }
        tensors.insert(k, info);
    }
    // No two tensors may share bytes (a crafted file could otherwise alias one tensor's data as another's).
    let mut ranges: Vec<(usize, usize, &str)> =
        tensors.iter().filter(|(_, t)| t.data_offsets.1 > t.data_offsets.0).map(|(k, t)| (t.data_offsets.0, t.data_offsets.1, k.as_str())).collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "tensors `{}` and `{}` overlap (bytes {}..{} and {}..{})",
                crate::text::printable_short(w[0].2, 120),
                crate::text::printable_short(w[1].2, 120),
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            ));
        }
    }
    Ok((tensors, metadata))
}

/// Read and validate a whole safetensors file held in memory: the header, and each tensor's bytes.
pub fn read_bytes(bytes: &[u8]) -> Result<(Header, &[u8]), String> {
    let header = read_header(&bytes)?;
    let data = &bytes[header.data_start as usize..];
    Ok((header, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    #[test]
    fn hostile_headers_are_refused_with_their_reason() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#;
        let (h, _) = read_bytes(&file(ok, 8)).unwrap();
        assert_eq!(h.metadata["k"], "v");
        let cases: &[(Vec<u8>, &str)] = &[
            (vec![1, 2, 3], "fewer than"),
            (u64::MAX.to_le_bytes().to_vec(), "more than"),
            (
                {
                    let mut f = file(ok, 8);
                    f.truncate(20);
                    f
                },
                "truncated",
            ),
            (file(ok, 4), "truncated"),
            (file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8), "overlap"),
            (file(r#"{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#, 8), "too many"),
            (file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8), "do not hold"),
            (file(r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8), "tensor `a`"),
            (file(r#"{"__metadata__":{"k":3}}"#, 0), "not a string"),
            (file(&"[".repeat(100_000), 0), "not a JSON object"),
            (file(&format!("{{\"a\":{}", "[".repeat(100_000)), 0), "not valid JSON"),
        ];
        for (bytes, want) in cases {
            let e = read_bytes(bytes).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
