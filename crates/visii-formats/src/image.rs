//! PNG / JPEG decoding as hostile input. A tiny file can claim a huge image (a 60 kB 1-bit PNG of
//! 22000 x 22000 px expands to gigabytes as RGB), so the size is read from the header first and
//! refused before anything is decoded; the decoder then runs under allocation limits too. Images
//! of extreme aspect ratios are refused: every use here (a working size in multiples of 8, CLIP's
//! shortest-side resize) would turn them into enormous or empty tensors.

use std::io::Cursor;

use crate::error::{FormatError, Result};

/// What an image may be.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest side in pixels.
    pub max_side: u32,
    /// Width x height.
    pub max_pixels: u64,
    /// Longer side over shorter side.
    pub max_aspect: u32,
    /// Bytes the decoder may allocate.
    pub max_alloc: u64,
    /// Shortest side in pixels.
    pub min_side: u32,
}

/// A 48 MP phone photo passes; a 2:1 panorama and a 16:1 strip pass; 65535 x 1 does not.
pub const LIMITS: Limits = Limits { max_side: 16384, max_pixels: 50_000_000, max_aspect: 16, max_alloc: 512 << 20, min_side: 8 };

/// Decode PNG or JPEG bytes to RGB8 (row-major), within [`LIMITS`].
pub fn decode_rgb(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize)> {
    decode_rgb_within(bytes, &LIMITS)
}

/// Decode within `limits`.
pub fn decode_rgb_within(bytes: &[u8], limits: &Limits) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = &*without_compressed_metadata(bytes);
    if jpeg_cut_short(bytes) {
        // The decoder would fill the missing rows with grey and say nothing.
        return Err(FormatError::Image(
            "the JPEG ends before its end-of-image marker: the file is cut short (an interrupted download or copy?); \
             if it looks whole elsewhere, save it again"
                .into(),
        ));
    }
    let unreadable = |e: &dyn std::fmt::Display| FormatError::Image(format!("not a readable PNG or JPEG image ({e})"));
    let reader = || image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| unreadable(&e));
    let (w, h) = reader()?.into_dimensions().map_err(|e| match e {
        // The header's size alone is beyond what the decoder may allocate (2^31 px wide, say).
        image::ImageError::Limits(_) => FormatError::Image(format!(
            "the size its header declares needs more memory to decode than an input image may use (at most {} px a side, {} pixels)",
            limits.max_side, limits.max_pixels
        )),
        e => unreadable(&e),
    })?;
    check_size(w, h, limits)?;
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    r.limits(l);
    let img = r.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => FormatError::Image(format!("{w}x{h} px needs more memory to decode than an input image may use")),
        e => unreadable(&e),
    })?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Ok((rgb.into_raw(), w as usize, h as usize))
}

/// A PNG without its compressed metadata chunks (`iCCP`, `zTXt`, `iTXt`); other bytes as they are.
/// The decoder inflates those chunks whole, and a few kilobytes of them can inflate to gigabytes:
/// within the allocation limit, that is still half a gigabyte of memory (which a tab's wasm memory
/// keeps) and seconds of work for a colour profile or text nothing here reads (pixels are taken as
/// sRGB). The chunks are walked up to IEND or to the first that does not parse; what follows is
/// kept as it is, for the decoder to read or refuse.
fn without_compressed_metadata(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    // Each whole chunk (length, type, data, CRC) in order: (start, end, whether it is dropped).
    let chunks = || {
        let (mut at, mut ended) = (SIGNATURE.len(), false);
        std::iter::from_fn(move || {
            let kind = bytes.get(at + 4..at + 8).filter(|_| !ended)?;
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let end = (at + 12).checked_add(len).filter(|&end| end <= bytes.len())?;
            ended = kind == b"IEND";
            let start = std::mem::replace(&mut at, end);
            Some((start, end, [b"iCCP", b"zTXt", b"iTXt"].iter().any(|t| kind == *t)))
        })
    };
    if !bytes.starts_with(SIGNATURE) || !chunks().any(|(_, _, dropped)| dropped) {
        return bytes.into();
    }
    let mut out = SIGNATURE.to_vec();
    let mut rest = SIGNATURE.len();
    for (start, end, dropped) in chunks() {
        if !dropped {
            out.extend_from_slice(&bytes[start..end]);
        }
        rest = end;
    }
    out.extend_from_slice(&bytes[rest..]);
    out.into()
}

/// Whether `bytes` are a JPEG whose image data starts but never reaches the end-of-image marker
/// (`FF D9`). Segments before the first scan are skipped by their lengths (an EXIF thumbnail holds
/// markers of its own); inside scan data a marker is an `FF` not followed by `00` (a stuffed byte)
/// and restart markers are part of the data, so an `FF D9` after the first scan is the end.
/// Anything that does not parse this far is left to the decoder.
fn jpeg_cut_short(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return false;
    }
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xff {
            return false;
        }
        let marker = bytes[at + 1];
        match marker {
            // Fill bytes, and markers without a length.
            0xff => at += 1,
            0x01 | 0xd0..=0xd7 => at += 2,
            0xd9 => return false,
            _ => {
                let len = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
                if marker == 0xda {
                    return !bytes.get(at + 2 + len..).is_some_and(|rest| rest.windows(2).any(|w| w == [0xff, 0xd9]));
                }
                at += 2 + len;
            }
        }
    }
    false
}

/// Refuse sizes outside `limits`, saying what is wrong.
pub fn check_size(w: u32, h: u32, limits: &Limits) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(FormatError::Image(format!("the image is {w}x{h} px: empty")));
    }
    if w.max(h) > limits.max_side || w as u64 * h as u64 > limits.max_pixels {
        return Err(FormatError::Image(format!(
            "the image is {w}x{h} px, larger than the {} px per side and {} megapixels an input may have: scale it down first",
            limits.max_side,
            limits.max_pixels / 1_000_000
        )));
    }
    if w.min(h) < limits.min_side {
        return Err(FormatError::Image(format!("the image is {w}x{h} px: too small (at least {} px per side)", limits.min_side)));
    }
    let (long, short) = (w.max(h), w.min(h));
    if long > short.saturating_mul(limits.max_aspect) {
        return Err(FormatError::Image(format!(
            "the image is {w}x{h} px: its aspect ratio is beyond {}:1; crop it to a less extreme shape",
            limits.max_aspect
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image::write_buffer_with_format(&mut out, &vec![7u8; (w * h) as usize], w, h, image::ExtendedColorType::L8, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn sizes_and_shapes_are_bounded_before_decoding() {
        let (rgb, w, h) = decode_rgb(&png(16, 8)).unwrap();
        assert_eq!((rgb.len(), w, h), (16 * 8 * 3, 16, 8));
        let e = decode_rgb(&png(4000, 8)).unwrap_err().to_string();
        assert!(e.contains("aspect"), "{e}");
        assert!(decode_rgb(&png(4, 4)).unwrap_err().to_string().contains("too small"));
        let e = decode_rgb(b"not an image at all").unwrap_err().to_string();
        assert!(e.contains("not a readable"), "{e}");
        let e = check_size(22000, 22000, &LIMITS).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn jpegs_cut_short_are_refused() {
        let whole = jpeg(64, 48);
        assert_eq!(decode_rgb(&whole).unwrap().1, 64);
        // Bytes after the end marker (some cameras append data) are no reason to refuse.
        assert!(decode_rgb(&[whole.as_slice(), b"trailing data"].concat()).is_ok());
        // An EXIF segment carrying a whole thumbnail, end marker included, before the main image.
        let thumb = jpeg(8, 8);
        let mut app1 = vec![0xff, 0xe1];
        app1.extend_from_slice(&((thumb.len() + 8) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(&thumb);
        let with_thumb = [&whole[..2], &app1[..], &whole[2..]].concat();
        assert!(decode_rgb(&with_thumb).is_ok());
        let sos = whole.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
        for cut in [whole.len() - 2, (sos + whole.len()) / 2, sos + 20] {
            for bytes in [whole[..cut].to_vec(), [&whole[..2], &app1[..], &whole[2..cut]].concat()] {
                let e = decode_rgb(&bytes).unwrap_err().to_string();
                assert!(e.contains("cut short"), "cut at {cut}: {e}");
            }
        }
    }

    /// `png` with a chunk (type, data) inserted after IHDR (signature 8 + IHDR 25 bytes).
    fn with_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc32fast::hash(&c[4..]).to_be_bytes());
        [&png[..33], &c[..], &png[33..]].concat()
    }

    #[test]
    fn compressed_metadata_is_not_inflated() {
        // A zlib stream of ~4 MiB of one value in a few kilobytes: a large grey PNG's image data.
        let big = png(2048, 2048);
        let idat = big.windows(4).position(|w| w == b"IDAT").expect("IDAT");
        let len = u32::from_be_bytes(big[idat - 4..idat].try_into().unwrap()) as usize;
        let zlib = &big[idat + 4..idat + 4 + len];
        assert!(zlib.len() < 64 << 10, "{} bytes", zlib.len());
        // A colour profile and text chunks of that. The decoder inflated such chunks up to its
        // allocation limit before it dropped them (512 MiB and seconds for a few megabytes of
        // file); now they are gone before it runs, and the pixels are the same.
        let plain = png(16, 8);
        let limits = Limits { max_alloc: 1 << 20, ..LIMITS };
        let iccp = with_chunk(&plain, b"iCCP", &[b"bomb\0\0".as_slice(), zlib].concat());
        let ztxt = with_chunk(&plain, b"zTXt", &[b"Comment\0\0".as_slice(), zlib].concat());
        let itxt = with_chunk(&plain, b"iTXt", &[b"XML:com.adobe.xmp\0\x01\0\0\0".as_slice(), zlib].concat());
        let all = with_chunk(&with_chunk(&iccp, b"zTXt", &[b"Comment\0\0".as_slice(), zlib].concat()), b"tEXt", b"Title\0kept");
        // Bytes after IEND (appended data), and a chunk that does not parse after the bomb.
        let trailing = [iccp.as_slice(), b"appended data after IEND"].concat();
        let mut broken = with_chunk(&plain, b"iCCP", &[b"bomb\0\0".as_slice(), zlib].concat());
        broken.splice(33 + 12 + 6 + zlib.len().., [0xff; 8]);
        assert_eq!(without_compressed_metadata(&trailing).len(), plain.len() + 24);
        assert_eq!(&*without_compressed_metadata(&broken), [&plain[..33], &[0xff; 8]].concat());
        for bomb in [&iccp, &ztxt, &itxt, &all, &trailing] {
            assert_eq!(decode_rgb_within(bomb, &limits).unwrap(), decode_rgb(&plain).unwrap());
            let kept = without_compressed_metadata(bomb);
            assert!(kept.len() < plain.len() + 30, "{} bytes kept of {}", kept.len(), bomb.len());
        }
        // Bytes that do not parse as chunks are left to the decoder.
        let cut = &iccp[..40];
        assert_eq!(&*without_compressed_metadata(cut), cut);
        assert!(decode_rgb(cut).is_err());
    }
}
