//! Fuzzing of every reader of untrusted bytes: safetensors headers, PyTorch zip + pickle
//! checkpoints, instruction files, pack manifests, model / scheduler / preprocessor configs, PNG
//! and JPEG decoding, and the text escaping of what is printed.
//!
//! Each target takes seeds (the committed fixtures: real files written by PyTorch, diffusers and
//! transformers, plus `tests/fuzz/regressions/<target>/*`, inputs that once failed) and mutates them
//! blindly (bit flips, interesting integers, cut, repeat, splice) and with structure in mind
//! (header JSON edited with its length prefix fixed, the pickle edited inside its zip, PNG chunks
//! edited with their CRC fixed, config fields replaced by hostile values), so mutations get past
//! the first check. Every case must end in `Ok` or `Err`: a panic, an allocation beyond a small
//! multiple of the input (a counting allocator measures every case), or a case slower than
//! `CASE_SECONDS` fails the test, and the input is written to `target/fuzz-failures/` with the
//! line that turns it into a regression input.
//!
//! In CI a bounded number of cases runs (`VISII_FUZZ_CASES` per target, default 20000: about 20 s
//! in all; 100000 per target take about 90 s). Longer, for one or more targets, with another seed:
//!
//! ```text
//! VISII_FUZZ_CASES=200000 VISII_FUZZ_SEED=7 VISII_FUZZ_TARGETS=pickle,png \
//!     cargo test -p visii-formats --test fuzz -- --nocapture
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use visii_formats::config::{ClipConfig, UNetConfig, VaeConfig};
use visii_formats::{image as img, instruction, manifest, preprocess, safetensors as st, text, torch, ByteSource};

// ------------------------------------------------------------------------------ counting allocator

/// Bytes allocated now and the most since the last `reset_peak`, across the process (the fuzz
/// runs in one test, one case at a time, so these are the case's).
struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ------------------------------------------------------------------------------------ randomness

/// SplitMix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Integers that break size arithmetic.
const INTERESTING: [u64; 16] =
    [0, 1, 2, 7, 8, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x1_0000_0000, 0x7fff_ffff_ffff_ffff, u64::MAX];

/// Blind byte-level mutations (one to four of them).
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0u8, 0xff, 0x7f, 0x80, b'(', b'.', b'"', b'{', b']'][rng.below(9)];
            }
            2 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = [1usize, 2, 4, 8][rng.below(4)];
                data[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            3 if len > 0 => data.truncate(rng.below(len)),
            4 if len > 0 => {
                // Delete a range.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                data.drain(a..b);
            }
            5 if len > 0 => {
                // Repeat a range (up to 64 kB more).
                let a = rng.below(len);
                let b = (a + 1 + rng.below(256)).min(len);
                let chunk = data[a..b].to_vec();
                let at = rng.below(len + 1);
                let times = 1 + rng.below(256);
                let rep: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
                data.splice(at..at, rep);
            }
            6 if !other.is_empty() => {
                // Splice in part of another seed.
                let a = rng.below(other.len());
                let b = (a + 1 + rng.below(4096)).min(other.len());
                let at = rng.below(len + 1);
                let end = (at + (b - a)).min(len);
                data.splice(at..end, other[a..b].iter().copied());
            }
            7 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    data[i] = data[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
}

/// Hostile JSON values for a config field or a header entry.
fn hostile_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1e10),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!("NaN"),
        6 => json!(null),
        7 => json!([]),
        8 => json!({}),
        9 => json!([0, 0, 0]),
        10 => json!(1e300),
        11 => json!(-0.0),
        12 => json!("\u{1b}[2J\u{202e}"),
        13 => json!(vec![1u32; 1 + rng.below(64)]),
        14 => json!(1 + rng.below(1 << 20)),
        _ => json!(true),
    }
}

/// Replace, remove or add a random field somewhere in a JSON value.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value, depth: usize) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            match rng.below(6) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(format!("x{}", rng.below(100)), hostile_json(rng));
                }
                2 | 3 if depth < 4 => mutate_json(rng, m.get_mut(&k).expect("key"), depth + 1),
                _ => {
                    m.insert(k, hostile_json(rng));
                }
            }
        }
        serde_json::Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            match rng.below(4) {
                0 => {
                    a.remove(i);
                }
                1 => a.push(hostile_json(rng)),
                2 if depth < 4 => mutate_json(rng, &mut a[i], depth + 1),
                _ => a[i] = hostile_json(rng),
            }
        }
        _ => *v = hostile_json(rng),
    }
}

// --------------------------------------------------------------------------------- structure

/// A safetensors file's header JSON edited, its length prefix fixed so the reader parses it.
fn mutate_safetensors_header(rng: &mut Rng, file: &[u8]) -> Option<Vec<u8>> {
    if file.len() < 8 {
        return None;
    }
    let n = u64::from_le_bytes(file[..8].try_into().ok()?) as usize;
    let header = file.get(8..8 + n)?;
    let mut v: serde_json::Value = serde_json::from_slice(header).ok()?;
    for _ in 0..1 + rng.below(3) {
        mutate_json(rng, &mut v, 0);
    }
    let text = serde_json::to_vec(&v).ok()?;
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&file[8 + n..]);
    Some(out)
}

/// A zip's stored `data.pkl` edited in place (same length: the archive stays readable), so the
/// mutation reaches the unpickler.
fn mutate_pickle_in_zip(rng: &mut Rng, file: &[u8]) -> Option<Vec<u8>> {
    // The central directory entry of `*/data.pkl` (the local header may carry no sizes): its size
    // and where its local header is; the data follows that header's name and extra field.
    let cd = file.windows(4).enumerate().filter(|(_, w)| *w == b"PK\x01\x02").map(|(i, _)| i).find(|&i| {
        let n = file.get(i + 28..i + 30).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize);
        file.get(i + 46..i + 46 + n).is_some_and(|name| name.ends_with(b"/data.pkl"))
    })?;
    let le32 = |i: usize| -> Option<usize> { Some(u32::from_le_bytes(file.get(i..i + 4)?.try_into().ok()?) as usize) };
    let le16 = |i: usize| -> Option<usize> { Some(u16::from_le_bytes(file.get(i..i + 2)?.try_into().ok()?) as usize) };
    let size = le32(cd + 20)?;
    let hdr = le32(cd + 42)?;
    let start = hdr + 30 + le16(hdr + 26)? + le16(hdr + 28)?;
    let end = start.checked_add(size).filter(|&e| e <= file.len())?;
    let mut out = file.to_vec();
    let pkl = &mut out[start..end];
    for _ in 0..1 + rng.below(4) {
        if pkl.is_empty() {
            break;
        }
        let i = rng.below(pkl.len());
        match rng.below(4) {
            // Opcodes a state dict uses, and ones it does not.
            0 => pkl[i] = b"()]}tlsuaeRQbhjqr01.NKMJX\x8c\x85\x86\x87\x94\x95\x80cX"[rng.below(32)],
            1 => pkl[i] ^= 1 << rng.below(8),
            2 if pkl.len() - i >= 4 => {
                let v = INTERESTING[rng.below(INTERESTING.len())] as u32;
                pkl[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => pkl[i] = rng.next() as u8,
        }
    }
    Some(out)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A PNG with one chunk's data edited (IHDR's size, depth and colour type most often) and its CRC
/// fixed, so the decoder acts on the edit.
fn mutate_png_chunk(rng: &mut Rng, file: &[u8]) -> Option<Vec<u8>> {
    if !file.starts_with(b"\x89PNG\r\n\x1a\n") {
        return None;
    }
    let mut chunks = vec![];
    let mut at = 8;
    while at + 12 <= file.len() {
        let n = u32::from_be_bytes(file[at..at + 4].try_into().ok()?) as usize;
        let end = at.checked_add(12 + n).filter(|&e| e <= file.len())?;
        chunks.push((at, n));
        at = end;
    }
    let (at, n) = if rng.chance(2) { chunks[0] } else { chunks[rng.below(chunks.len())] };
    let mut out = file.to_vec();
    let data = &mut out[at + 8..at + 8 + n];
    if &file[at + 4..at + 8] == b"IHDR" && n == 13 {
        match rng.below(4) {
            0 => data[0..4].copy_from_slice(&(INTERESTING[rng.below(INTERESTING.len())] as u32).to_be_bytes()),
            1 => data[4..8].copy_from_slice(&(rng.below(70000) as u32).to_be_bytes()),
            2 => data[8] = [1u8, 2, 4, 8, 16, 3, 0][rng.below(7)],
            _ => data[9] = [0u8, 2, 3, 4, 6, 1, 7][rng.below(7)],
        }
    } else if n > 0 {
        let i = rng.below(n);
        data[i] ^= 1 << rng.below(8);
    }
    let crc = crc32(&out[at + 4..at + 8 + n]);
    out[at + 8 + n..at + 12 + n].copy_from_slice(&crc.to_be_bytes());
    Some(out)
}

// ------------------------------------------------------------------------------------ targets

struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// A structure-aware mutation, when it applies to a seed.
    structured: fn(&mut Rng, &[u8]) -> Option<Vec<u8>>,
    /// Run the reader: whether it accepted the input (`Ok` or `Err` are both fine; only panics,
    /// memory and time are failures).
    run: fn(&[u8]) -> bool,
    /// Bytes a case may allocate at most, for an input of `n` bytes.
    max_alloc: fn(usize) -> usize,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The committed regression inputs of a target.
fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/regressions").join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).map(|p| (p.clone(), std::fs::read(&p).expect("read"))).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// A valid instruction file (the format's own fields).
fn instruction_seed(positions: usize, hidden: usize) -> Vec<u8> {
    let values: Vec<u8> = (0..positions * hidden).flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes()).collect();
    let header = serde_json::json!({
        "__metadata__": {"format": instruction::FORMAT, "format_version": instruction::FORMAT_VERSION, "eos": "3", "hidden_size": hidden.to_string(), "model": "tiny",
            "noise_reuse": "{\"seed\":1,\"timesteps\":[999,500]}"},
        "instruction": {"dtype": "F32", "shape": [positions, hidden], "data_offsets": [0, values.len()]}
    });
    let text = serde_json::to_vec(&header).expect("json");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(values);
    out
}

fn manifest_seed() -> Vec<u8> {
    let cfg = br#"{"a": 1}"#;
    serde_json::to_vec(&serde_json::json!({
        "format": manifest::FORMAT,
        "shards": [{"path": "unet/model-00000.safetensors", "bytes": 1234, "sha256": "ab".repeat(32)}],
        "files": [{"path": "unet/config.json", "bytes": cfg.len(), "sha256": manifest::sha256_hex(cfg)}, {"path": "clip/config.json", "bytes": 3, "sha256": "00".repeat(32)}],
    }))
    .expect("json")
}

fn jpeg_seed() -> Vec<u8> {
    let rgb: Vec<u8> = (0..24 * 16 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = vec![];
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode(&rgb, 24, 16, image::ExtendedColorType::Rgb8).expect("jpeg");
    out
}

/// Small decode limits: what a case may allocate is bounded by them, not by the file.
const FUZZ_IMAGE_LIMITS: img::Limits = img::Limits { max_side: 4096, max_pixels: 1 << 22, max_aspect: 16, max_alloc: 64 << 20, min_side: 8 };

fn targets() -> Vec<Target> {
    let safetensors_files = [
        "tests/fixtures/tiny-ip2p/vae/diffusion_pytorch_model.safetensors",
        "tests/fixtures/goldens/apply_noise.safetensors",
        "tests/fixtures/goldens/learn_schedule.safetensors",
    ];
    let configs = [
        "tests/fixtures/tiny-ip2p/unet/config.json",
        "tests/fixtures/tiny-ip2p/vae/config.json",
        "tests/fixtures/tiny-ip2p/text_encoder/config.json",
        "tests/fixtures/tiny-clip/config.json",
        "tests/fixtures/tiny-ip2p/scheduler/scheduler_config.json",
        "tests/fixtures/tiny-unet-linear/config.json",
    ];
    let small = |n: usize| 64 * n + (64 << 20);
    vec![
        Target {
            name: "safetensors",
            seeds: safetensors_files.iter().map(|f| read(f)).chain([instruction_seed(4, 8)]).collect(),
            structured: mutate_safetensors_header,
            run: |b| {
                let source: &[u8] = b;
                let _ = st::read_header(&source);
                let Ok((h, data)) = st::read_bytes(b) else { return false };
                for t in h.tensors.values() {
                    // Every range the reader accepted lies within the data and has the shape's size.
                    let (a, z) = t.data_offsets;
                    assert!(a <= z && z <= data.len(), "accepted range {a}..{z} of {}", data.len());
                    assert_eq!(st::byte_len(t.dtype, &t.shape), Some(z - a), "accepted size");
                }
                true
            },
            max_alloc: small,
        },
        Target {
            name: "pickle",
            seeds: [
                "tests/fixtures/torch-bin/vae/diffusion_pytorch_model.bin",
                "tests/fixtures/torch-bin/text_encoder/pytorch_model-00002-of-00002.bin",
                "tests/fixtures/torch-bin/legacy.bin",
            ]
            .iter()
            .map(|f| read(f))
            .collect(),
            structured: mutate_pickle_in_zip,
            run: |b| {
                let source: &[u8] = b;
                let Ok(ts) = torch::read_index(&source) else { return false };
                for (_, t) in ts {
                    // Every tensor accepted lies within the file.
                    let es = t.dtype.bitsize() / 8;
                    let end = (t.start as usize).checked_add(t.span().checked_mul(es).expect("span fits")).expect("end fits");
                    assert!(end <= b.len(), "accepted tensor ends at {end}, past the file's {} bytes", b.len());
                    let _ = t.gather(&b[t.start as usize..end]);
                }
                true
            },
            max_alloc: small,
        },
        Target {
            name: "instruction",
            seeds: vec![instruction_seed(4, 8), instruction_seed(77, 32), instruction_seed(2, 1)],
            structured: mutate_safetensors_header,
            run: |b| {
                let Ok(f) = instruction::parse(b) else { return false };
                assert_eq!(f.rows.len(), f.positions * f.hidden);
                assert!(f.eos >= 1 && f.eos < f.positions);
                let _ = f.check_fits(32, 77);
                true
            },
            max_alloc: small,
        },
        Target {
            name: "manifest",
            seeds: vec![manifest_seed()],
            structured: |rng, b| {
                let mut v: serde_json::Value = serde_json::from_slice(b).ok()?;
                mutate_json(rng, &mut v, 0);
                serde_json::to_vec(&v).ok()
            },
            run: |b| {
                let Ok(m) = manifest::parse(b) else { return false };
                for rel in m.small_files("") {
                    assert!(!rel.split('/').any(|seg| seg == ".." || seg.is_empty()), "{rel}");
                    let _ = m.verify(rel, b"{}");
                }
                let source: std::sync::Arc<dyn ByteSource> = std::sync::Arc::new(std::sync::Arc::<[u8]>::from(&b[..]));
                if let Ok(v) = m.verified("unet/model-00000.safetensors", source) {
                    let _ = v.read_at(0, 1.min(b.len()));
                }
                true
            },
            max_alloc: small,
        },
        Target {
            name: "config",
            seeds: configs.iter().map(|f| read(f)).collect(),
            structured: |rng, b| {
                let mut v: serde_json::Value = serde_json::from_slice(b).ok()?;
                for _ in 0..1 + rng.below(3) {
                    mutate_json(rng, &mut v, 0);
                }
                serde_json::to_vec(&v).ok()
            },
            run: |b| {
                let Ok(t) = std::str::from_utf8(b) else { return false };
                let mut accepted = false;
                if let Ok(c) = visii_formats::config::from_json::<UNetConfig>(t) {
                    if c.validate().is_ok() {
                        // What the networks are built from stays within the bounds validation promises.
                        let _ = (c.time_embed_dim(), (0..c.block_out_channels.len()).map(|i| c.heads(i)).sum::<usize>());
                        accepted = true;
                    }
                }
                if let Ok(c) = visii_formats::config::from_json::<VaeConfig>(t) {
                    if c.validate().is_ok() {
                        let _ = c.downscale();
                        accepted = true;
                    }
                }
                if let Ok(c) = visii_formats::config::from_json::<ClipConfig>(t) {
                    accepted |= c.validate().is_ok();
                }
                accepted |=
                    visii_formats::config::from_json::<visii_formats::config::ClipTextConfig>(t).map(|c| c.validate().is_ok()).unwrap_or(false);
                accepted
            },
            max_alloc: small,
        },
        Target {
            name: "preprocess",
            seeds: vec![read("tests/fixtures/tiny-clip/preprocessor_config.json")],
            structured: |rng, b| {
                let mut v: serde_json::Value = serde_json::from_slice(b).ok()?;
                for _ in 0..1 + rng.below(3) {
                    mutate_json(rng, &mut v, 0);
                }
                serde_json::to_vec(&v).ok()
            },
            run: |b| {
                let Ok(t) = std::str::from_utf8(b) else { return false };
                let Ok(c) = visii_formats::config::from_json::<preprocess::ClipPreprocessConfig>(t) else { return false };
                if c.validate().is_err() {
                    return false;
                }
                let rgb = vec![128u8; 40 * 24 * 3];
                let Ok((v, shape)) = c.apply(&rgb, 40, 24) else { return false };
                assert_eq!(v.len(), shape.iter().product::<usize>());
                true
            },
            max_alloc: small,
        },
        Target {
            name: "image",
            seeds: vec![read("tests/fixtures/images/before.png"), read("tests/fixtures/images/tall.png"), jpeg_seed()],
            structured: mutate_png_chunk,
            run: |b| {
                let Ok((rgb, w, h)) = img::decode_rgb_within(b, &FUZZ_IMAGE_LIMITS) else { return false };
                assert_eq!(rgb.len(), w * h * 3);
                assert!(w >= 8 && h >= 8 && w.max(h) <= 16 * w.min(h), "{w}x{h} accepted");
                true
            },
            // The decoder's own limit, RGBA and RGB copies of at most that many pixels, and the file.
            max_alloc: |n| 3 * (64 << 20) + 4 * n,
        },
        Target {
            name: "text",
            seeds: vec![b"plain".to_vec(), "\u{1b}]0;title\u{7}\u{202e}abc\u{9b}2J\r\n\t\u{200f}".as_bytes().to_vec()],
            structured: |_, _| None,
            run: |b| {
                let s = String::from_utf8_lossy(b);
                for out in [text::printable(&s), text::printable_short(&s, 40)] {
                    assert!(!out.chars().any(text::is_unsafe), "unsafe characters survive: {out:?}");
                }
                true
            },
            max_alloc: small,
        },
    ]
}

// ------------------------------------------------------------------------------------ runner

const CASE_SECONDS: u64 = 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Where a failing input is written.
fn failure_dir() -> PathBuf {
    root().join("target/fuzz-failures")
}

fn save_failure(target: &str, case: &str, input: &[u8]) -> PathBuf {
    let dir = failure_dir();
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{target}-{case}.bin"));
    let _ = std::fs::write(&p, input);
    p
}

/// Run one case: its outcome (`None`: fine), measuring what it allocated beyond what was live.
fn run_case(t: &Target, input: &[u8]) -> Result<bool, String> {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    // The panic is reported with the case: the default hook would print every one as it happens.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    let took = started.elapsed();
    std::panic::set_hook(hook);
    let used = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    let accepted = r.map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        format!("panicked: {msg}")
    })?;
    if used > (t.max_alloc)(input.len()) {
        return Err(format!("allocated {used} bytes for an input of {} bytes (at most {})", input.len(), (t.max_alloc)(input.len())));
    }
    if took > Duration::from_secs(CASE_SECONDS) {
        return Err(format!("took {took:?}"));
    }
    Ok(accepted)
}

/// The case being run, for the watchdog: a reader that hangs is named before the process ends.
static CURRENT_CASE: Mutex<(String, Vec<u8>)> = Mutex::new((String::new(), Vec::new()));
static CASE_STARTED_MS: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicBool = AtomicBool::new(false);

fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64 + 1
}

/// One test (the allocation counts are the process's: nothing else may run meanwhile).
#[test]
fn fuzz_every_reader() {
    harness_catches_panics_and_blowups();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        while !DONE.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
            let s = CASE_STARTED_MS.load(Ordering::Relaxed);
            if s != 0 && now_ms(t0).saturating_sub(s) > 6 * CASE_SECONDS * 1000 {
                let (case, input) = CURRENT_CASE.lock().map(|c| c.clone()).unwrap_or_default();
                let p = save_failure("hang", &case.replace(' ', "-"), &input);
                eprintln!("FUZZ HANG: {case} has run for over {} s (its input: {})", 6 * CASE_SECONDS, p.display());
                std::process::exit(101);
            }
        }
    });
    let cases = env_usize("VISII_FUZZ_CASES", 20000);
    let seed = env_usize("VISII_FUZZ_SEED", 1) as u64;
    let only: Option<Vec<String>> = std::env::var("VISII_FUZZ_TARGETS").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut failures = vec![];
    for t in targets() {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == t.name)) {
            continue;
        }
        assert!(!t.seeds.is_empty(), "{}: no seeds", t.name);
        let started = Instant::now();
        let mut fixed: Vec<(String, Vec<u8>)> = vec![];
        for (i, s) in t.seeds.iter().enumerate() {
            fixed.push((format!("seed{i}"), s.clone()));
        }
        for (p, b) in regressions(t.name) {
            fixed.push((format!("regression {}", p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()), b));
        }
        let n_fixed = fixed.len();
        let mut fixed = fixed.into_iter();
        let mut structured = 0;
        let mut rng = Rng::new(seed ^ (t.name.len() as u64) << 40 ^ t.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
        // Cases are made one at a time (a target's seeds may be megabytes each).
        let mut next = |case: usize| -> (String, Vec<u8>) {
            let base = &t.seeds[rng.below(t.seeds.len())];
            let other = &t.seeds[rng.below(t.seeds.len())];
            let input = match rng.below(3) {
                0 => (t.structured)(&mut rng, base).inspect(|_| structured += 1),
                _ => None,
            };
            let mut input = input.unwrap_or_else(|| base.clone());
            if input == *base || rng.chance(3) {
                mutate_bytes(&mut rng, &mut input, other);
            }
            (format!("case{case}"), input)
        };
        let (mut failed, mut accepted, mut seeds_accepted) = (0, 0, 0);
        for i in 0..n_fixed + cases {
            let (name, input) = match fixed.next() {
                Some(f) => f,
                None => next(i - n_fixed),
            };
            if let Ok(mut c) = CURRENT_CASE.lock() {
                c.0 = format!("{} {name} (seed {seed})", t.name);
                c.1.clear();
                c.1.extend_from_slice(&input);
            }
            CASE_STARTED_MS.store(now_ms(t0), Ordering::Relaxed);
            let outcome = run_case(&t, &input);
            CASE_STARTED_MS.store(0, Ordering::Relaxed);
            match &outcome {
                Ok(true) if name.starts_with("seed") => seeds_accepted += 1,
                _ => {}
            }
            accepted += usize::from(outcome == Ok(true));
            if let Err(why) = outcome {
                failed += 1;
                let p = save_failure(t.name, &format!("{seed}-{name}"), &input);
                failures.push(format!(
                    "{} {name}: {why}\n    input: {} (keep it: cp {} crates/visii-formats/tests/fuzz/regressions/{}/)",
                    t.name,
                    p.display(),
                    p.display(),
                    t.name
                ));
            }
        }
        drop(next);
        eprintln!(
            "FUZZ {}: {} inputs ({n_fixed} seeds and regressions, {structured} structure-aware), {accepted} accepted, {failed} failed, {:.1} s",
            t.name,
            n_fixed + cases,
            started.elapsed().as_secs_f64()
        );
        // The seeds are real files: a reader (or a harness) that refuses them all tests nothing.
        if seeds_accepted == 0 {
            failures.push(format!("{}: none of its seeds is accepted", t.name));
        }
    }
    DONE.store(true, Ordering::Relaxed);
    assert!(failures.is_empty(), "{} fuzz cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// The harness finds what it is meant to: a reader that panics, one that allocates far beyond its
/// input, and a structure-aware mutation that reaches past the first check.
fn harness_catches_panics_and_blowups() {
    let t =
        Target { name: "probe", seeds: vec![], structured: |_, _| None, run: |b| b.len() != 3 || panic!("three bytes"), max_alloc: |_| usize::MAX };
    assert!(run_case(&t, b"abc").unwrap_err().contains("three bytes"));
    assert_eq!(run_case(&t, b"ab"), Ok(true));
    let t = Target {
        name: "probe",
        seeds: vec![],
        structured: |_, _| None,
        run: |b| std::hint::black_box(vec![0u8; b.len() * 1000]).len() > 0,
        max_alloc: |n| 10 * n,
    };
    assert!(run_case(&t, &[0; 100]).unwrap_err().contains("allocated"));
    // A header edit keeps the file parseable as far as the header: the length prefix is right.
    let mut rng = Rng::new(3);
    let seed = instruction_seed(4, 8);
    let mut reached_json = 0;
    for _ in 0..50 {
        let m = mutate_safetensors_header(&mut rng, &seed).expect("header");
        let n = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize;
        if serde_json::from_slice::<serde_json::Value>(&m[8..8 + n]).is_ok() {
            reached_json += 1;
        }
    }
    assert_eq!(reached_json, 50);
    // A pickle edit keeps the zip readable: the unpickler, not the zip reader, refuses it.
    let bin = read("tests/fixtures/torch-bin/vae/diffusion_pytorch_model.bin");
    let mut pickle_errors = 0;
    for _ in 0..50 {
        let m = mutate_pickle_in_zip(&mut rng, &bin).expect("pickle found");
        assert_eq!(m.len(), bin.len());
        let source: &[u8] = &m;
        if let Err(e) = torch::read_index(&source) {
            if !e.contains("zip") && !e.contains("archive") {
                pickle_errors += 1;
            }
        }
    }
    assert!(pickle_errors > 10, "{pickle_errors} of 50 pickle edits reached the unpickler");
    // A PNG edit keeps the CRCs right: the decoder acts on the new size.
    let png = read("tests/fixtures/images/before.png");
    let mut ihdr_seen = 0;
    for _ in 0..50 {
        let m = mutate_png_chunk(&mut rng, &png).expect("png");
        if let Err(e) = img::decode_rgb_within(&m, &FUZZ_IMAGE_LIMITS) {
            assert!(!e.to_string().to_lowercase().contains("crc"), "{e}");
            ihdr_seen += 1;
        }
    }
    assert!(ihdr_seen > 0);
}
