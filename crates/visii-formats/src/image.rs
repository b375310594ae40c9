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
}
