//! CLIP image preprocessing as transformers' PIL path does it (`CLIPImageProcessorPil` with
//! `preprocessor_config.json`): shortest side to 224 with PIL's bicubic filter (reproduced
//! bit-exactly: fixed-point coefficients, horizontal pass first, 8-bit intermediate), centre crop,
//! rescale, normalise with the CLIP mean / std.

use serde::Deserialize;

use crate::error::{FormatError, Result};
pub use crate::image::decode_rgb;

/// The fields of `preprocessor_config.json` we use (CLIP defaults otherwise).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ClipPreprocessConfig {
    pub do_resize: bool,
    pub size: serde_json::Value,
    pub do_center_crop: bool,
    pub crop_size: serde_json::Value,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub resample: u32,
}

impl Default for ClipPreprocessConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: serde_json::json!({"shortest_edge": 224}),
            do_center_crop: true,
            crop_size: serde_json::json!({"height": 224, "width": 224}),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.48145466, 0.4578275, 0.40821073],
            image_std: vec![0.26862954, 0.26130258, 0.27577711],
            resample: 3,
        }
    }
}

/// A side length from a config value: a positive integer up to 4096.
fn side(field: &str, v: &serde_json::Value) -> std::result::Result<usize, String> {
    match v.as_u64() {
        Some(n) if (1..=4096).contains(&n) => Ok(n as usize),
        _ => Err(format!("`{field}` is {v}, expected a whole number of pixels in 1..=4096")),
    }
}

impl ClipPreprocessConfig {
    /// `size` as `{"shortest_edge": N}` (transformers 4.2x) or a bare number (older files).
    pub fn shortest_edge(&self) -> std::result::Result<usize, String> {
        match &self.size {
            v @ serde_json::Value::Number(_) => side("size", v),
            serde_json::Value::Object(m) => side("size.shortest_edge", m.get("shortest_edge").unwrap_or(&serde_json::Value::Null)),
            v => Err(format!("`size` is {v}, expected {{\"shortest_edge\": N}}")),
        }
    }

    /// `crop_size` as `{"height": H, "width": W}` or a bare number: (height, width).
    pub fn crop(&self) -> std::result::Result<(usize, usize), String> {
        match &self.crop_size {
            v @ serde_json::Value::Number(_) => side("crop_size", v).map(|n| (n, n)),
            serde_json::Value::Object(m) => {
                let get = |k: &str| side(&format!("crop_size.{k}"), m.get(k).unwrap_or(&serde_json::Value::Null));
                Ok((get("height")?, get("width")?))
            }
            v => Err(format!("`crop_size` is {v}, expected {{\"height\": H, \"width\": W}}")),
        }
    }

    /// Every field `apply` uses, naming the one that is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.do_resize {
            self.shortest_edge()?;
            if self.resample != 2 && self.resample != 3 {
                return Err(format!("`resample` {} is not supported (bicubic = 3, bilinear = 2)", self.resample));
            }
        }
        if self.do_center_crop {
            self.crop()?;
        }
        if self.do_rescale && !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0 && self.rescale_factor <= 1.0) {
            return Err(format!("`rescale_factor` is {}, expected a number in (0, 1]", self.rescale_factor));
        }
        if self.do_normalize {
            if self.image_mean.len() != 3 || self.image_std.len() != 3 {
                return Err(format!("`image_mean` and `image_std` need 3 values each, found {} and {}", self.image_mean.len(), self.image_std.len()));
            }
            if self.image_mean.iter().any(|v| !v.is_finite()) || self.image_std.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err("`image_mean` must be finite and `image_std` finite and positive".into());
            }
        }
        Ok(())
    }

    /// RGB8 image (row-major, `w * h * 3`) -> pixel values [3, crop_h, crop_w] (channel-major).
    pub fn apply(&self, rgb: &[u8], w: usize, h: usize) -> Result<(Vec<f32>, [usize; 3])> {
        if w == 0 || h == 0 || w.checked_mul(h).and_then(|n| n.checked_mul(3)) != Some(rgb.len()) {
            return Err(FormatError::Image(format!("expected {w}x{h} RGB pixels, got {} bytes", rgb.len())));
        }
        self.validate().map_err(|m| FormatError::Config { path: "preprocessor_config.json".into(), message: m })?;
        let (mut img, mut w, mut h) = (rgb.to_vec(), w, h);
        if self.do_resize {
            let s = self.shortest_edge().map_err(|m| FormatError::Config { path: "preprocessor_config.json".into(), message: m })?;
            let (nw, nh) = if w <= h { (s, (s as f64 * h as f64 / w as f64) as usize) } else { ((s as f64 * w as f64 / h as f64) as usize, s) };
            // The longer side grows with the aspect ratio: bound it (decoding bounds the ratio to 16:1).
            if nw.max(nh) > 16 * s || nw == 0 || nh == 0 {
                return Err(FormatError::Image(format!("a {w}x{h} image is too elongated for CLIP's {s} px shortest-side resize")));
            }
            let filter = match self.resample {
                3 => Filter::Bicubic,
                2 => Filter::Bilinear,
                other => return Err(FormatError::Unsupported(format!("preprocessor resample mode {other} (bicubic = 3, bilinear = 2)"))),
            };
            img = pil_resize(&img, w, h, nw, nh, filter);
            (w, h) = (nw, nh);
        }
        let (ch, cw) = if self.do_center_crop {
            self.crop().map_err(|m| FormatError::Config { path: "preprocessor_config.json".into(), message: m })?
        } else {
            (h, w)
        };
        if ch > h || cw > w {
            return Err(FormatError::Image(format!("image {w}x{h} is smaller than the {cw}x{ch} crop")));
        }
        let (top, left) = ((h - ch) / 2, (w - cw) / 2);
        let scale = if self.do_rescale { self.rescale_factor as f32 } else { 1.0 };
        let mut out = vec![0f32; 3 * ch * cw];
        for c in 0..3 {
            let (m, s) = if self.do_normalize { (self.image_mean[c], self.image_std[c]) } else { (0.0, 1.0) };
            for y in 0..ch {
                for x in 0..cw {
                    let v = img[((top + y) * w + left + x) * 3 + c] as f32 * scale;
                    out[(c * ch + y) * cw + x] = (v - m) / s;
                }
            }
        }
        Ok((out, [3, ch, cw]))
    }
}

/// PIL's resampling filters used here.
#[derive(Clone, Copy, Debug)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos3,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                let sinc = |v: f64| {
                    if v == 0.0 {
                        1.0
                    } else {
                        (v * std::f64::consts::PI).sin() / (v * std::f64::consts::PI)
                    }
                };
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients per output pixel: (first input index, weights).
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| filter.eval((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + f) as i32
                    } else {
                        (0.5 + f) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize` for 8-bit RGB (`reducing_gap=None`): bit-exact with Pillow.
pub fn pil_resize(src: &[u8], w: usize, h: usize, nw: usize, nh: usize, filter: Filter) -> Vec<u8> {
    let mut cur = src.to_vec();
    let mut cw = w;
    if nw != w {
        let k = coefficients(w, nw, filter);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            for (xx, (xmin, kk)) in k.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in kk.iter().enumerate() {
                        ss += cur[(y * cw + xmin + i) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * nw + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = out;
        cw = nw;
    }
    if nh != h {
        let k = coefficients(h, nh, filter);
        let mut out = vec![0u8; cw * nh * 3];
        for (yy, (ymin, kk)) in k.iter().enumerate() {
            for x in 0..cw {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in kk.iter().enumerate() {
                        ss += cur[((ymin + i) * cw + x) * 3 + c] as i64 * kv as i64;
                    }
                    out[(yy * cw + x) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = out;
    }
    cur
}
