//! A zip archive written whole in memory, for the results the page hands out as one download: every
//! entry stored (method 0: the results are PNGs, compressed already), names in UTF-8 (flag bit 11),
//! the CRC-32 of every entry checked by any unzip. No zip64: an archive is refused past 4 GiB or
//! 65 535 entries, and entry names that an unzip could write outside its folder are refused.

use std::collections::HashSet;

/// The most an archive may hold: every offset in a plain zip is 32-bit, and 0xffffffff means "see
/// the zip64 record".
pub const MAX_BYTES: u64 = u32::MAX as u64 - 1;
/// The most entries a plain zip's end record counts (0xffff, too, means zip64).
pub const MAX_ENTRIES: usize = u16::MAX as usize - 1;

/// Why an archive was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipError {
    #[error("zip entry name {0:?} is not a safe relative path (empty, absolute, '..', a backslash, a control character or over 255 bytes)")]
    Name(String),
    #[error("zip entry name {0:?} appears twice")]
    Duplicate(String),
    #[error("the zip would hold more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("the zip would be larger than 4 GiB")]
    TooLarge,
}

/// A name an unzip writes inside its folder: relative, `/`-separated, no `.` / `..` / empty
/// components, no backslash or control character, at most 255 bytes.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|c| c.is_control() || c == '\\' || c == ':')
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// The archive of `entries` (name, bytes), in that order.
pub fn stored<N: AsRef<str>, B: AsRef<[u8]>>(entries: &[(N, B)]) -> Result<Vec<u8>, ZipError> {
    if entries.len() > MAX_ENTRIES {
        return Err(ZipError::TooManyEntries);
    }
    let mut seen = HashSet::new();
    let mut total = 22u64;
    for (name, bytes) in entries {
        let name = name.as_ref();
        if !safe_name(name) {
            return Err(ZipError::Name(crate::text::printable_short(name, 80)));
        }
        if !seen.insert(name) {
            return Err(ZipError::Duplicate(crate::text::printable_short(name, 80)));
        }
        total += 30 + 46 + 2 * name.len() as u64 + bytes.as_ref().len() as u64;
    }
    if total > MAX_BYTES {
        return Err(ZipError::TooLarge);
    }
    let mut out = Vec::with_capacity(total as usize);
    let mut central = Vec::new();
    for (name, bytes) in entries {
        let (name, bytes) = (name.as_ref().as_bytes(), bytes.as_ref());
        let crc = crc32fast::hash(bytes);
        let (len, offset) = (bytes.len() as u32, out.len() as u32);
        // Local header: version 2.0, UTF-8 names, stored, no time stamp.
        for v in [0x0403_4b50u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [20u16, 0x0800, 0, 0, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, len, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [name.len() as u16, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(name);
        out.extend_from_slice(bytes);
        // Its central directory record.
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        for v in [20u16, 20, 0x0800, 0, 0, 0] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, len, len] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [name.len() as u16, 0, 0, 0, 0] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [0u32, offset] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        central.extend_from_slice(name);
    }
    let (dir_offset, dir_len, count) = (out.len() as u32, central.len() as u32, entries.len() as u16);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    for v in [0u16, 0, count, count] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [dir_len, dir_offset] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    debug_assert_eq!(out.len() as u64, total);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch::{read_entry as read_zip_entry, zip_entries as zip_directory};

    #[test]
    fn crc_is_the_zip_crc() {
        // The check value of CRC-32 (ISO-HDLC), the one zip uses.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn archives_read_back_entry_by_entry() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let entries = [("001-cat.png", &b"\x89PNG fake"[..]), ("settings.json", b"[{\"seed\": 1}]"), ("dir/ü-ñ.bin", &big), ("empty", b"")];
        let zip = stored(&entries).unwrap();
        let dir = zip_directory(&&zip[..]).unwrap();
        assert_eq!(dir.len(), entries.len());
        for (name, bytes) in entries {
            let e = &dir[name];
            assert_eq!(read_zip_entry(&&zip[..], e).unwrap(), bytes, "{name}");
        }
        // The layout: the first local header, the first name at 30, the end record's counts.
        assert_eq!(&zip[..4], b"PK\x03\x04");
        assert_eq!(&zip[30..41], b"001-cat.png");
        let end = zip.len() - 22;
        assert_eq!(&zip[end..end + 4], b"PK\x05\x06");
        assert_eq!(u16::from_le_bytes([zip[end + 10], zip[end + 11]]), 4);
        // CRC of the first entry in its local header.
        assert_eq!(u32::from_le_bytes(zip[14..18].try_into().unwrap()), crc32fast::hash(b"\x89PNG fake"));
    }

    #[test]
    fn an_empty_archive_is_the_end_record_alone() {
        let zip = stored::<&str, &[u8]>(&[]).unwrap();
        assert_eq!(zip.len(), 22);
        assert!(zip_directory(&&zip[..]).unwrap().is_empty());
    }

    #[test]
    fn unsafe_or_repeated_names_are_refused() {
        for bad in ["", "/etc/passwd", "../x.png", "a/../../x", "a//b", "./a", "a\\b", "C:x", "a\u{0}b", "a\nb", &"x".repeat(256)] {
            assert!(matches!(stored(&[(bad, b"x")]), Err(ZipError::Name(_))), "{bad:?}");
        }
        assert_eq!(stored(&[("a.png", b"1"), ("a.png", b"2")]), Err(ZipError::Duplicate("a.png".into())));
        let many: Vec<(String, &[u8])> = (0..=MAX_ENTRIES).map(|i| (format!("{i}"), &b""[..])).collect();
        assert_eq!(stored(&many), Err(ZipError::TooManyEntries));
    }
}
