//! Builders of hostile inputs for `tests/hostile.rs`: hand-made safetensors, PNG / JPEG byte
//! streams (a zlib writer of its own, since no deflate crate is a dev-dependency), PyTorch zip
//! archives with crafted pickles, and small file-system helpers (tree copies, edits, FIFOs).

use std::collections::BTreeMap;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Checksums

/// CRC-32 (IEEE, as PNG and zip use it).
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *t = c;
    }
    let mut c = 0xffff_ffffu32;
    for part in parts {
        for &b in *part {
            c = table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
    }
    c ^ 0xffff_ffff
}

/// Adler-32 (zlib's trailer).
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

// ---------------------------------------------------------------------------------------------
// zlib / PNG / JPEG

/// A zlib stream of stored (uncompressed) deflate blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i == last));
        out.extend((c.len() as u16).to_le_bytes());
        out.extend((!(c.len() as u16)).to_le_bytes());
        out.extend(*c);
    }
    out.extend(adler32(data).to_be_bytes());
    out
}

/// Deflate's bit order: values least significant bit first, Huffman codes most significant first.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    fn code(&mut self, code: u32, len: u32) {
        let rev = (0..len).fold(0u64, |r, i| r | ((((code >> i) & 1) as u64) << (len - 1 - i)));
        self.put(rev, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// A zlib stream of `n` zero bytes in one fixed-Huffman block: a literal 0 and then copies of
/// 258 bytes at distance 1 (13 bits each), so ~60 MB of zeros take ~380 kB.
pub fn zlib_zeros(n: usize) -> Vec<u8> {
    let mut b = Bits { out: vec![0x78, 0x01], acc: 0, n: 0 };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE = 01, fixed Huffman codes
    let literal0 = |b: &mut Bits| b.code(0x30, 8);
    let mut left = n;
    if left > 0 {
        literal0(&mut b);
        left -= 1;
    }
    while left >= 258 {
        b.code(0b1100_0101, 8); // length symbol 285: 258 bytes, no extra bits
        b.code(0, 5); // distance symbol 0: distance 1
        left -= 258;
    }
    for _ in 0..left {
        literal0(&mut b);
    }
    b.code(0, 7); // end of block (256)
    let mut out = b.finish();
    // Adler-32 of n zeros: a stays 1, b grows by 1 per byte.
    out.extend(((((n % 65521) as u32) << 16) | 1).to_be_bytes());
    out
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    out.extend(crc32(&[kind, data]).to_be_bytes());
}

/// A PNG from its parts: IHDR fields, an optional palette, the zlib stream of the filtered rows.
pub fn png(width: u32, height: u32, bit_depth: u8, color_type: u8, palette: Option<&[u8]>, zlib: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    if let Some(p) = palette {
        png_chunk(&mut out, b"PLTE", p);
    }
    png_chunk(&mut out, b"IDAT", zlib);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A valid 1-bit PNG (grayscale, or a two-colour palette) of `width` x `height` black pixels:
/// tiny on disk, `width * height` bytes or more once decoded.
pub fn png_1bit_bomb(width: u32, height: u32, palette: bool) -> Vec<u8> {
    let row = 1 + (width as usize).div_ceil(8);
    let zlib = zlib_zeros(row * height as usize);
    if palette {
        png(width, height, 1, 3, Some(&[0, 0, 0, 255, 255, 255]), &zlib)
    } else {
        png(width, height, 1, 0, None, &zlib)
    }
}

/// `png` (a whole PNG) with a chunk inserted right after its IHDR.
pub fn png_with_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = Vec::new();
    png_chunk(&mut chunk, kind, data);
    [&png[..33], &chunk[..], &png[33..]].concat()
}

/// `image` (PNG bytes) re-encoded as a JPEG.
pub fn jpeg_of(png: &[u8]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::load_from_memory(png).expect("a PNG").write_to(&mut out, image::ImageFormat::Jpeg).expect("JPEG encoding");
    out.into_inner()
}

/// An 8-bit RGB PNG through the `image` crate.
pub fn png_rgb(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// The start of a baseline JPEG claiming `width` x `height` pixels (SOI, DQT, SOF0, DHT, SOS)
/// followed by a few bytes of scan data and no end: a header promising gigabytes.
pub fn jpeg_claim(width: u16, height: u16) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    // DQT: one 8-bit table of ones.
    out.extend([0xff, 0xdb, 0x00, 0x43, 0x00]);
    out.extend([1u8; 64]);
    // SOF0: 8-bit, height, width, 3 components sampling 1x1, table 0.
    out.extend([0xff, 0xc0, 0x00, 0x11, 0x08]);
    out.extend(height.to_be_bytes());
    out.extend(width.to_be_bytes());
    out.extend([0x03, 0x01, 0x11, 0x00, 0x02, 0x11, 0x00, 0x03, 0x11, 0x00]);
    // DHT: a DC and an AC table with one code of length 1 each (symbol 0).
    for class in [0x00u8, 0x10] {
        out.extend([0xff, 0xc4, 0x00, 0x14, class]);
        let mut counts = [0u8; 16];
        counts[0] = 1;
        out.extend(counts);
        out.push(0);
    }
    // SOS: 3 components, tables 0/0.
    out.extend([0xff, 0xda, 0x00, 0x0c, 0x03, 0x01, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x3f, 0x00]);
    out.extend([0u8; 16]);
    out
}

// ---------------------------------------------------------------------------------------------
// safetensors by hand

/// One tensor of a hand-made safetensors file: dtype as the header spells it ("F32", "I64", ...).
pub struct St {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl St {
    pub fn new(name: &str, dtype: &str, shape: &[u64], data: Vec<u8>) -> Self {
        St { name: name.into(), dtype: dtype.into(), shape: shape.to_vec(), data }
    }
    pub fn f32(name: &str, shape: &[u64], values: &[f32]) -> Self {
        St::new(name, "F32", shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A safetensors file: 8-byte little-endian header length, the JSON header (padded with spaces
/// to a multiple of 8), the tensors' bytes back to back in the order given.
pub fn safetensors(tensors: &[St], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(m).expect("metadata"));
    }
    let mut at = 0u64;
    for t in tensors {
        let end = at + t.data.len() as u64;
        header.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [at, end]}));
        at = end;
    }
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    safetensors_raw(serde_json::to_string(&header).expect("header").as_bytes(), &data)
}

/// Header bytes as given (padded with spaces to a multiple of 8) and data.
pub fn safetensors_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = header.to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    with_length_field(h.len() as u64, &[&h, data])
}

/// A length field (any value) followed by bytes.
pub fn with_length_field(len: u64, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    for p in parts {
        out.extend(*p);
    }
    out
}

/// The JSON header of a safetensors file and where its data starts.
pub fn read_header(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
    (header, 8 + n)
}

// ---------------------------------------------------------------------------------------------
// PyTorch archives

/// A zip archive of stored entries, as `torch.save` writes it (the layout of
/// `visii-models`' own torch tests).
pub fn zip_stored(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut out, mut cd) = (Vec::new(), Vec::new());
    for (name, data) in entries {
        let local = out.len() as u32;
        let crc = crc32(&[data]);
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method 0, time, date
        out.extend(crc.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(*data);
        cd.extend(0x0201_4b50u32.to_le_bytes());
        cd.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // versions, flags, method, time, date
        cd.extend(crc.to_le_bytes());
        cd.extend((data.len() as u32).to_le_bytes());
        cd.extend((data.len() as u32).to_le_bytes());
        cd.extend((name.len() as u16).to_le_bytes());
        cd.extend([0u8; 12]); // extra and comment lengths, disk, attributes
        cd.extend(local.to_le_bytes());
        cd.extend(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend(&cd);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    let n = entries.len() as u16;
    out.extend(n.to_le_bytes());
    out.extend(n.to_le_bytes());
    out.extend((cd.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// A protocol-2 pickle: the header, `body` repeated until the pickle is about `bytes` long,
/// then STOP.
pub fn pickle_repeat(prefix: &[u8], body: &[u8], bytes: usize) -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    p.extend(prefix);
    while p.len() + body.len() < bytes {
        p.extend(body);
    }
    p.push(b'.');
    p
}

/// A `torch.save` archive around a pickle (with a byteorder entry and one small storage).
pub fn torch_archive(pickle: &[u8]) -> Vec<u8> {
    zip_stored(&[("archive/data.pkl", pickle), ("archive/byteorder", b"little"), ("archive/data/0", &[0u8; 16])])
}

// ---------------------------------------------------------------------------------------------
// Files

/// Copy a folder; files over 64 kB are hard-linked where possible (never edit them in place:
/// use [`replace`]).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("create {}: {e}", dst.display()));
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let e = e.expect("dir entry");
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let meta = std::fs::metadata(&from).expect("metadata");
        if meta.is_dir() {
            copy_tree(&from, &to);
        } else if meta.len() < 64 << 10 || std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
    }
}

/// Replace a file's contents by a new file (breaks hard links instead of writing through them).
pub fn replace(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir_all(path);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Edit a JSON file through `f` (written back pretty-printed, as a new file).
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("parse json");
    f(&mut v);
    replace(path, serde_json::to_string_pretty(&v).expect("json").as_bytes());
}

/// Replace `path` (file or nothing) by a named pipe.
pub fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let ok = std::process::Command::new("mkfifo").arg(path).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "mkfifo {}", path.display());
}

/// Replace `path` by a symbolic link to `target`.
pub fn symlink(target: &Path, path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir_all(path);
    std::os::unix::fs::symlink(target, path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
}

/// Replace `path` by an empty directory.
pub fn dir_in_place(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path).expect("mkdir");
}
