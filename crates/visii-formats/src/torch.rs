//! PyTorch checkpoints (`pytorch_model.bin`, `diffusion_pytorch_model.bin`): what transformers and
//! diffusers wrote by default through 2023, before safetensors became their default. Such a file is
//! the zip archive `torch.save` writes (PyTorch >= 1.6): `<root>/data.pkl`, a pickle of the state
//! dict, and `<root>/data/<key>`, one stored (uncompressed) entry per storage.
//!
//! The pickle is *read*, never run: a small interpreter for the opcodes Python's pickler emits builds
//! a value tree, and only what a state dict is made of is understood (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, the storage types as persistent ids).
//! Any other callable is refused by name, so a malicious file cannot do anything. The result is an
//! index of tensors as byte ranges in the archive, read one at a time like a safetensors file's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use safetensors::tensor::Dtype;

use crate::source::ByteSource;

/// One tensor of the checkpoint: where its first element lies in the file and how it is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's first element in the file.
    pub start: u64,
    /// Element strides when the tensor is not stored contiguously in row-major order.
    pub strides: Option<Vec<usize>>,
}

impl TorchTensor {
    /// Elements spanned in the storage from the first one (the whole tensor when contiguous).
    /// [`read_index`] has checked that this fits the storage, so it cannot overflow here.
    pub fn span(&self) -> usize {
        span_of(&self.shape, self.strides.as_deref()).and_then(|n| usize::try_from(n).ok()).unwrap_or(usize::MAX)
    }

    /// The tensor's bytes in row-major order from the bytes of its span.
    pub fn gather(&self, span: &[u8]) -> Vec<u8> {
        let Some(st) = &self.strides else { return span.to_vec() };
        let es = self.dtype.bitsize() / 8;
        let n: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(n * es);
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let at = idx.iter().zip(st).map(|(i, s)| i * s).sum::<usize>() * es;
            out.extend_from_slice(&span[at..at + es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
}

/// Whether the bytes start like a zip archive (what `torch.save` writes).
pub fn is_zip(source: &dyn ByteSource) -> bool {
    source.len() >= 4 && source.read_at(0, 4).map(|b| b == b"PK\x03\x04").unwrap_or(false)
}

/// The tensors of a `torch.save` archive, by their state-dict names.
pub fn read_index(source: &dyn ByteSource) -> Result<Vec<(String, TorchTensor)>, String> {
    let len = source.len();
    if !is_zip(source) {
        let legacy = source.len() >= 2 && source.read_at(0, 2).map(|b| b[0] == 0x80).unwrap_or(false);
        return Err(if legacy {
            "a PyTorch file in the format before PyTorch 1.6 (not a zip archive): load it in PyTorch and save it again".into()
        } else {
            "not a PyTorch checkpoint (no zip archive)".into()
        });
    }
    let entries = zip_entries(source)?;
    // `<root>/data.pkl`, the root being the archive's name (the file's stem, or `archive`).
    let pkl = entries.keys().filter(|k| k.split_once('/').map_or(k.as_str(), |(_, rest)| rest) == "data.pkl").min_by_key(|k| k.len()).cloned();
    let pkl = pkl.ok_or("the archive has no data.pkl (not a torch.save file)")?;
    let root = pkl[..pkl.len() - "data.pkl".len()].to_string();
    if let Some(e) = entries.get(&format!("{root}byteorder")) {
        let b = read_entry(source, e)?;
        if b != b"little" {
            return Err(format!("saved with byte order `{}`; only little-endian checkpoints are supported", String::from_utf8_lossy(&b)));
        }
    }
    if entries[&pkl].size > MAX_PICKLE_BYTES as u64 {
        return Err(format!("its pickle has {} bytes, too large to be a state dict (at most {MAX_PICKLE_BYTES})", entries[&pkl].size));
    }
    let pickle = read_entry(source, &entries[&pkl])?;
    let top = Unpickler::new(&pickle).run()?;
    let dict = state_dict(&top).ok_or("the pickle holds no state dict (a mapping of names to tensors)")?;
    let mut out = Vec::new();
    let mut starts: HashMap<String, u64> = HashMap::new(); // storage key -> where its bytes start
    for (k, v) in dict.borrow().iter() {
        let Val::Tensor(t) = v else { continue };
        let name = match k {
            Val::Str(s) => s.to_string(),
            _ => return Err("a state-dict key is not a string".into()),
        };
        let e = entries.get(&format!("{root}data/{}", t.key)).ok_or_else(|| format!("tensor {name}: storage {} is not in the archive", t.key))?;
        if e.method != 0 {
            return Err(format!("storage {} is compressed (method {}); torch.save stores them uncompressed", t.key, e.method));
        }
        let es = (t.dtype.bitsize() / 8) as u64;
        let strides = if contiguous(&t.shape, &t.stride) { None } else { Some(t.stride.clone()) };
        // The tensor's elements, the span they lie in and the storage's bytes must all fit the
        // storage entry (so a crafted file cannot make a read or a gather larger than the file).
        let storage = (t.numel as u64).checked_mul(es).filter(|&b| b <= e.size);
        let fits = (|| {
            let storage = storage?;
            let bytes = numel(&t.shape)?.checked_mul(es)?;
            let end = (t.offset as u64).checked_add(span_of(&t.shape, strides.as_deref())?)?.checked_mul(es)?;
            (t.stride.len() == t.shape.len() && bytes <= storage && end <= storage).then_some(t.offset as u64 * es)
        })();
        let Some(first) = fits else {
            return Err(format!(
                "tensor {name}: {:?} {:?} at element {} does not lie within its storage of {} elements ({} bytes in the archive)",
                t.dtype, t.shape, t.offset, t.numel, e.size
            ));
        };
        let data = match starts.get(&t.key) {
            Some(d) => *d,
            None => {
                let d = data_offset(source, e)?;
                if d.checked_add(e.size).is_none_or(|end| end > len) {
                    return Err(format!("storage {} runs past the end of the file (truncated download?)", t.key));
                }
                starts.insert(t.key.clone(), d);
                d
            }
        };
        out.push((name, TorchTensor { dtype: t.dtype, shape: t.shape.clone(), start: data + first, strides }));
    }
    if out.is_empty() {
        return Err("the state dict holds no tensors".into());
    }
    Ok(out)
}

/// Elements of `shape` (None on overflow).
fn numel(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

/// Elements spanned from the first one with these strides (None on overflow).
fn span_of(shape: &[usize], strides: Option<&[usize]>) -> Option<u64> {
    if shape.contains(&0) {
        return Some(0);
    }
    match strides {
        None => numel(shape),
        Some(st) => shape.iter().zip(st).try_fold(1u64, |acc, (&n, &s)| acc.checked_add((n as u64 - 1).checked_mul(s as u64)?)),
    }
}

fn contiguous(shape: &[usize], stride: &[usize]) -> bool {
    if shape.len() != stride.len() {
        return false;
    }
    let mut want = 1;
    for (n, s) in shape.iter().zip(stride).rev() {
        if *n != 1 && *s != want {
            return false;
        }
        want *= n;
    }
    true
}

/// The state dict in a loaded pickle: the top-level mapping, or its `state_dict` entry (Lightning
/// and original Stable Diffusion checkpoints wrap it).
fn state_dict(top: &Val) -> Option<Rc<RefCell<Pairs>>> {
    let Val::Dict(d) = top else { return None };
    let inner = d.borrow().iter().find_map(|(k, v)| match (k, v) {
        (Val::Str(s), Val::Dict(inner)) if &**s == "state_dict" => Some(inner.clone()),
        _ => None,
    });
    Some(inner.unwrap_or_else(|| d.clone()))
}

// ------------------------------------------------------------------------------------------- zip

pub(crate) struct Entry {
    method: u16,
    size: u64,
    local: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The archive's central directory (zip64 included: a fp32 UNet's archive is 3.4 GB).
pub(crate) fn zip_entries(source: &dyn ByteSource) -> Result<HashMap<String, Entry>, String> {
    let len = source.len();
    let tail_len = len.min(22 + 65535);
    let tail = source.read_at(len - tail_len, tail_len as usize)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(&tail, i) == 0x0605_4b50)
        .ok_or("no zip directory at the end (truncated download?)")?;
    let mut count = le16(&tail, eocd + 10) as u64;
    let mut cd_size = le32(&tail, eocd + 12) as u64;
    let mut cd_offset = le32(&tail, eocd + 16) as u64;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        let at = (len - tail_len + eocd as u64).checked_sub(20).ok_or("zip64 locator missing")?;
        let loc = source.read_at(at, 20)?;
        if le32(&loc, 0) != 0x0706_4b50 {
            return Err("zip64 locator missing".into());
        }
        let rec = source.read_at(le64(&loc, 8), 56).map_err(|e| format!("zip64 directory: {e}"))?;
        if le32(&rec, 0) != 0x0606_4b50 {
            return Err("zip64 directory record missing".into());
        }
        (count, cd_size, cd_offset) = (le64(&rec, 32), le64(&rec, 40), le64(&rec, 48));
    }
    if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) || cd_size > 1 << 30 {
        return Err("the zip directory does not lie within the file (truncated download?)".into());
    }
    let cd = source.read_at(cd_offset, cd_size as usize)?;
    let mut entries = HashMap::new();
    let mut p = 0usize;
    for _ in 0..count {
        if p + 46 > cd.len() || le32(&cd, p) != 0x0201_4b50 {
            return Err("corrupt zip directory".into());
        }
        let method = le16(&cd, p + 10);
        let (mut size, mut local) = (le32(&cd, p + 24) as u64, le32(&cd, p + 42) as u64);
        let csize = le32(&cd, p + 20) as u64;
        let (n, x, c) = (le16(&cd, p + 28) as usize, le16(&cd, p + 30) as usize, le16(&cd, p + 32) as usize);
        if p + 46 + n + x + c > cd.len() {
            return Err("corrupt zip directory".into());
        }
        let name = String::from_utf8_lossy(&cd[p + 46..p + 46 + n]).into_owned();
        // zip64 extra field: the 64-bit values of the fields that read 0xffffffff, in this order.
        let mut extra = &cd[p + 46 + n..p + 46 + n + x];
        while extra.len() >= 4 {
            let (id, l) = (le16(extra, 0), le16(extra, 2) as usize);
            let body = extra.get(4..4 + l).ok_or("corrupt zip extra field")?;
            if id == 1 {
                let mut q = 0;
                let mut next = |v: &mut u64| {
                    if *v == 0xffff_ffff && q + 8 <= body.len() {
                        *v = le64(body, q);
                        q += 8;
                    }
                };
                next(&mut size);
                let mut c64 = csize;
                next(&mut c64);
                next(&mut local);
            }
            extra = &extra[4 + l..];
        }
        // Two entries of one name: which one an unzip or PyTorch takes is a matter of who wrote it.
        if entries.contains_key(&name) {
            return Err(format!("the zip holds two entries named {name:?} (not a file torch.save writes)"));
        }
        entries.insert(name, Entry { method, size, local });
        p += 46 + n + x + c;
    }
    Ok(entries)
}

/// Where an entry's bytes start (after its local header, whose extra field torch uses for alignment).
fn data_offset(source: &dyn ByteSource, e: &Entry) -> Result<u64, String> {
    if e.local.checked_add(30).is_none_or(|end| end > source.len()) {
        return Err("a zip entry header lies past the end of the file (truncated download?)".into());
    }
    let h = source.read_at(e.local, 30).map_err(|m| format!("zip entry header: {m}"))?;
    if le32(&h, 0) != 0x0403_4b50 {
        return Err("corrupt zip entry header".into());
    }
    Ok(e.local + 30 + le16(&h, 26) as u64 + le16(&h, 28) as u64)
}

pub(crate) fn read_entry(source: &dyn ByteSource, e: &Entry) -> Result<Vec<u8>, String> {
    if e.method != 0 {
        return Err(format!("compressed zip entry (method {})", e.method));
    }
    if e.size > 1 << 30 {
        return Err("a zip entry too large to be a state dict's pickle".into());
    }
    source.read_at(data_offset(source, e)?, e.size as usize)
}

// ---------------------------------------------------------------------------------------- pickle

/// A storage as the pickle names it (its persistent id).
#[derive(Debug, Clone)]
struct Storage {
    dtype: Dtype,
    key: String,
    numel: usize,
}

#[derive(Debug, Clone)]
struct TensorVal {
    dtype: Dtype,
    key: String,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A pickled value. Scalars a state dict does not use are kept for the `Debug` text of errors.
#[derive(Debug, Clone)]
#[allow(dead_code)]
enum Val {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Items>),
    List(Rc<RefCell<Items>>),
    Dict(Rc<RefCell<Pairs>>),
    Global(Rc<GlobalName>),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorVal>),
}

/// `module.name` of a pickled global.
#[derive(Debug)]
struct GlobalName {
    module: String,
    name: String,
}

// Every value is one pointer wide plus its tag: a pickle's memory is counted per value (see
// `Unpickler::charge`), so a large variant would make every value cost more.
const _: () = assert!(std::mem::size_of::<Val>() <= 24);

impl Val {
    fn int(&self) -> Result<usize, String> {
        match self {
            Val::Int(i) => usize::try_from(*i).map_err(|_| format!("expected a size, found {i}")),
            other => Err(format!("expected a non-negative integer, found {}", other.kind())),
        }
    }
    fn ints(&self) -> Result<Vec<usize>, String> {
        match self {
            Val::Tuple(v) => v.iter().map(Val::int).collect(),
            Val::List(v) => v.borrow().iter().map(Val::int).collect(),
            other => Err(format!("expected a tuple of integers, found {}", other.kind())),
        }
    }
    /// What a value is, for messages (never its contents: they may be huge or cyclic).
    fn kind(&self) -> String {
        match self {
            Val::Global(g) => format!("`{}.{}`", g.module, g.name),
            Val::Str(s) => format!("the string {:?}", s.chars().take(60).collect::<String>()),
            Val::Mark => "a mark".into(),
            Val::None => "None".into(),
            Val::Bool(_) => "a bool".into(),
            Val::Int(i) => format!("the integer {i}"),
            Val::Float(_) => "a float".into(),
            Val::Bytes(_) => "bytes".into(),
            Val::Tuple(_) => "a tuple".into(),
            Val::List(_) => "a list".into(),
            Val::Dict(_) => "a dict".into(),
            Val::Storage(_) => "a storage".into(),
            Val::Tensor(_) => "a tensor".into(),
        }
    }
}

fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "FloatStorage" | "float32" | "float" => Dtype::F32,
        "HalfStorage" | "float16" | "half" => Dtype::F16,
        "BFloat16Storage" | "bfloat16" => Dtype::BF16,
        "DoubleStorage" | "float64" | "double" => Dtype::F64,
        "LongStorage" | "int64" | "long" => Dtype::I64,
        "IntStorage" | "int32" | "int" => Dtype::I32,
        "ShortStorage" | "int16" | "short" => Dtype::I16,
        "CharStorage" | "int8" => Dtype::I8,
        "ByteStorage" | "uint8" => Dtype::U8,
        "BoolStorage" | "bool" => Dtype::BOOL,
        _ => return None,
    })
}

/// The items of a tuple or list. Dropping one never recurses: a crafted pickle can nest values
/// millions deep, which a recursive drop would overflow the stack on, so a container's items are
/// handed to [`dispose`], which drops them one level at a time. Cycles (a list inside itself) are
/// left to leak, bounded by the pickle's memory budget.
#[derive(Debug, Default)]
struct Items(Vec<Val>);

/// The items of a dict (see [`Items`]).
#[derive(Debug, Default)]
struct Pairs(Vec<(Val, Val)>);

impl std::ops::Deref for Items {
    type Target = Vec<Val>;
    fn deref(&self) -> &Vec<Val> {
        &self.0
    }
}
impl std::ops::DerefMut for Items {
    fn deref_mut(&mut self) -> &mut Vec<Val> {
        &mut self.0
    }
}
impl std::ops::Deref for Pairs {
    type Target = Vec<(Val, Val)>;
    fn deref(&self) -> &Vec<(Val, Val)> {
        &self.0
    }
}
impl std::ops::DerefMut for Pairs {
    fn deref_mut(&mut self) -> &mut Vec<(Val, Val)> {
        &mut self.0
    }
}
impl Drop for Items {
    fn drop(&mut self) {
        dispose(std::mem::take(&mut self.0));
    }
}
impl Drop for Pairs {
    fn drop(&mut self) {
        dispose(std::mem::take(&mut self.0).into_iter().flat_map(|(k, v)| [k, v]).collect());
    }
}

thread_local! {
    /// Values whose drop is deferred to the [`dispose`] loop running further up the stack.
    static PENDING: RefCell<Option<Vec<Val>>> = const { RefCell::new(None) };
}

/// Drop values without recursion: the outermost call drops them one by one; a container dropped
/// meanwhile hands its items back here (to `PENDING`) instead of dropping them itself.
fn dispose(vals: Vec<Val>) {
    let mut work = vals;
    let nested = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        match p.as_mut() {
            Some(pending) => {
                pending.append(&mut work);
                true
            }
            None => {
                *p = Some(Vec::new());
                false
            }
        }
    });
    if nested {
        return;
    }
    loop {
        while let Some(v) = work.pop() {
            drop(v);
        }
        let more = PENDING.with(|p| std::mem::take(p.borrow_mut().as_mut().expect("set above")));
        if more.is_empty() {
            break;
        }
        work = more;
    }
    PENDING.with(|p| *p.borrow_mut() = None);
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    memo: HashMap<u32, Val>,
    /// Bytes of memory the pickle's values may still take (see [`memory_budget`]).
    budget: usize,
}

/// The largest pickle read: a state dict's names, shapes and storage ids (a full-size UNet's is
/// about 150 kB; a model with tens of thousands of tensors a few MB).
pub const MAX_PICKLE_BYTES: usize = 8 << 20;

/// Bytes of memory a pickle of `len` bytes may make its values take. Real state dicts take 10-20
/// bytes of values per pickle byte (measured on the committed checkpoints PyTorch wrote, see the
/// tests: a two-byte memo fetch is two 24-byte slots); a crafted one of one-byte push opcodes would
/// take up to a hundred per byte. The budget keeps a reader's memory within a small multiple of
/// the pickle's size: at most ~420 MB, for the largest pickle read.
fn memory_budget(len: usize) -> usize {
    48 * len + (32 << 20)
}

/// What a value pushed on the stack costs: its stack slot, the slot of the container it will
/// likely end up in, and the memory it owns (not its items', charged when they were pushed).
fn cost(v: &Val) -> usize {
    const SLOT: usize = std::mem::size_of::<Val>();
    const RC: usize = 2 * std::mem::size_of::<usize>();
    2 * SLOT
        + match v {
            Val::Mark | Val::None | Val::Bool(_) | Val::Int(_) | Val::Float(_) => 0,
            Val::Str(s) => RC + s.len(),
            Val::Bytes(b) => RC + b.len(),
            Val::Tuple(t) => RC + std::mem::size_of::<Vec<Val>>() + t.capacity() * SLOT,
            Val::List(_) => RC + std::mem::size_of::<RefCell<Items>>(),
            Val::Dict(_) => RC + std::mem::size_of::<RefCell<Pairs>>(),
            Val::Global(g) => RC + std::mem::size_of::<GlobalName>() + g.module.len() + g.name.len(),
            Val::Storage(s) => RC + std::mem::size_of::<Storage>() + s.key.len(),
            Val::Tensor(t) => RC + std::mem::size_of::<TensorVal>() + t.key.len() + (t.shape.len() + t.stride.len()) * 8,
        }
}

impl Drop for Unpickler<'_> {
    fn drop(&mut self) {
        let mut all = std::mem::take(&mut self.stack);
        all.extend(self.memo.drain().map(|(_, v)| v));
        dispose(all);
    }
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), budget: memory_budget(data.len()) }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("the pickle ends early (truncated file?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(le32(self.take(4)?, 0))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends early (truncated file?)")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Val, String> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn top(&mut self) -> Result<&mut Val, String> {
        self.stack.last_mut().ok_or_else(|| "pickle stack underflow".to_string())
    }
    /// Everything above the topmost mark (the mark removed).
    fn pop_mark(&mut self) -> Result<Vec<Val>, String> {
        let m = self.stack.iter().rposition(|v| matches!(v, Val::Mark)).ok_or("pickle mark missing")?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn str_of(&mut self, n: usize) -> Result<Val, String> {
        let b = self.take(n)?;
        Ok(Val::Str(std::str::from_utf8(b).map_err(|_| "a pickle string is not UTF-8")?.into()))
    }
    /// Take `bytes` from the memory budget.
    fn charge(&mut self, bytes: usize) -> Result<(), String> {
        self.budget = self
            .budget
            .checked_sub(bytes)
            .ok_or("the pickle creates far more values than a state dict of its size has (over its memory limit); it is not a state dict")?;
        Ok(())
    }
    /// Push a value, charging what it costs.
    fn push(&mut self, v: Val) -> Result<(), String> {
        self.charge(cost(&v))?;
        self.stack.push(v);
        Ok(())
    }
    fn memo_put(&mut self, k: u32) -> Result<(), String> {
        // A hash-map entry (key and value) with the map's spare room.
        self.charge(2 * (std::mem::size_of::<u32>() + std::mem::size_of::<Val>()) + 8)?;
        let v = self.stack.last().ok_or("pickle stack underflow")?.clone();
        self.memo.insert(k, v);
        Ok(())
    }
    fn memo_get(&mut self, k: u32) -> Result<(), String> {
        let v = self.memo.get(&k).ok_or_else(|| format!("pickle memo {k} missing"))?.clone();
        // A shared reference: only its slots.
        self.charge(2 * std::mem::size_of::<Val>())?;
        self.stack.push(v);
        Ok(())
    }
    fn len_of(&mut self, n: u64) -> Result<usize, String> {
        usize::try_from(n).map_err(|_| "a pickle length does not fit".to_string())
    }

    fn run(mut self) -> Result<Val, String> {
        self.run_all()
    }

    fn run_all(&mut self) -> Result<Val, String> {
        if self.data.len() > MAX_PICKLE_BYTES {
            return Err(format!("the pickle has {} bytes, too large to be a state dict (at most {MAX_PICKLE_BYTES})", self.data.len()));
        }
        loop {
            let op = self.u8()?;
            // Every value pushed is charged (`push`); so is every opcode, for the time it takes.
            self.charge(1)?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.push(Val::Mark)?,
                b'N' => self.push(Val::None)?,
                0x88 => self.push(Val::Bool(true))?,
                0x89 => self.push(Val::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Val::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Val::Int(v as i64))?
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Val::Int(le16(b, 0) as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("a pickle integer wider than 64 bits".into());
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Val::Int(i64::from_le_bytes(buf)))?
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let l = l.trim_end_matches('L');
                    self.push(match l {
                        "01" => Val::Bool(true),
                        "00" => Val::Bool(false),
                        _ => Val::Int(l.parse().map_err(|_| format!("bad pickle integer {l:?}"))?),
                    })?
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.push(Val::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))))?
                }
                b'F' => {
                    let l = self.line()?;
                    self.push(Val::Float(l.parse().map_err(|_| format!("bad pickle float {l:?}"))?))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str_of(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.str_of(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    let n = self.len_of(n)?;
                    let v = self.str_of(n)?;
                    self.push(v)?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    self.push(Val::Str(b.iter().map(|&c| c as char).collect::<String>().into()))?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => {
                            let n = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
                            self.len_of(n)?
                        }
                    };
                    let b = self.take(n)?;
                    self.push(Val::Bytes(b.into()))?
                }
                b')' => self.push(Val::Tuple(Rc::default()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Val::Tuple(Rc::new(Items(items))))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Val::Tuple(Rc::new(Items(items))))?
                }
                b']' => self.push(Val::List(Rc::default()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Val::List(Rc::new(RefCell::new(Items(items)))))?
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.top()? {
                        Val::List(l) => l.borrow_mut().extend(items),
                        other => return Err(format!("pickle appends to {}", other.kind())),
                    }
                }
                b'}' => self.push(Val::Dict(Rc::default()))?,
                b'd' | b's' | b'u' => {
                    let items = match op {
                        b's' => {
                            let v = self.pop()?;
                            let k = self.pop()?;
                            vec![k, v]
                        }
                        _ => self.pop_mark()?,
                    };
                    if items.len() % 2 != 0 {
                        return Err("odd number of pickle dict items".into());
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    if op == b'd' {
                        self.push(Val::Dict(Rc::new(RefCell::new(Pairs(pairs)))))?;
                    } else {
                        match self.top()? {
                            Val::Dict(d) => d.borrow_mut().extend(pairs),
                            other => return Err(format!("pickle sets items on {}", other.kind())),
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Val::Global(Rc::new(GlobalName { module, name })))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => self.push(Val::Global(Rc::new(GlobalName { module: m.to_string(), name: n.to_string() })))?,
                        _ => return Err("bad pickle STACK_GLOBAL".into()),
                    }
                }
                b'q' | b'r' | 0x94 | b'p' | b'h' | b'j' | b'g' => {
                    let k = match op {
                        b'q' | b'h' => self.u8()? as u32,
                        b'r' | b'j' => self.u32()?,
                        0x94 => self.memo.len() as u32,
                        _ => self.line()?.parse().map_err(|_| "bad pickle memo key")?,
                    };
                    if matches!(op, b'h' | b'j' | b'g') {
                        self.memo_get(k)?
                    } else {
                        self.memo_put(k)?
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(pid)?;
                    self.push(v)?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = call(f, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: an object's state (an OrderedDict's `_metadata`); not needed.
                    self.pop()?;
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }
}

/// A persistent id: `('storage', torch.<Type>Storage, key, location, numel)`.
fn persistent(pid: Val) -> Result<Val, String> {
    let Val::Tuple(t) = pid else { return Err(format!("unsupported persistent id {}", pid.kind())) };
    match t.as_slice() {
        [Val::Str(tag), Val::Global(g), Val::Str(key), _location, numel] if &**tag == "storage" && g.module == "torch" => {
            let ty = &g.name;
            let dtype = storage_dtype(ty).ok_or_else(|| format!("unsupported storage type torch.{ty}"))?;
            Ok(Val::Storage(Rc::new(Storage { dtype, key: key.to_string(), numel: numel.int()? })))
        }
        _ => Err("unsupported persistent id (not a torch storage)".into()),
    }
}

/// The only calls a state dict needs. Anything else is refused, never run.
fn call(f: Val, args: Val) -> Result<Val, String> {
    let Val::Global(g) = &f else { return Err(format!("the pickle calls {}", f.kind())) };
    let (m, n) = (&g.module, &g.name);
    let Val::Tuple(a) = args else { return Err(format!("the pickle calls `{m}.{n}` with {}", args.kind())) };
    match (m.as_str(), n.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => match a.as_slice() {
            [] => Ok(Val::Dict(Rc::default())),
            _ => Err(format!("`{m}.{n}` with arguments")),
        },
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => match a.as_slice() {
            [Val::Storage(s), offset, size, stride, ..] => Ok(Val::Tensor(Rc::new(TensorVal {
                dtype: s.dtype,
                key: s.key.clone(),
                numel: s.numel,
                offset: offset.int()?,
                shape: size.ints()?,
                stride: stride.ints()?,
            }))),
            _ => Err(format!("`{m}.{n}` with unexpected arguments")),
        },
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => match a.first() {
            Some(t @ Val::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("`{m}.{n}` without a tensor")),
        },
        _ => Err(format!("the pickle calls `{m}.{n}`, which a state dict of tensors does not need; it was not run")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_tensors_gather_in_row_major_order() {
        // A 2 x 3 tensor stored transposed: storage [a00 a10 a01 a11 a02 a12], strides (1, 2).
        let t = TorchTensor { dtype: Dtype::U8, shape: vec![2, 3], start: 0, strides: Some(vec![1, 2]) };
        assert_eq!(t.span(), 6);
        assert_eq!(t.gather(&[0, 10, 1, 11, 2, 12]), vec![0, 1, 2, 10, 11, 12]);
        assert!(contiguous(&[1, 77], &[0, 1]), "size-1 dimensions' strides do not matter");
        assert!(!contiguous(&[2, 3], &[1, 2]));
    }

    /// A protocol-2 pickle of `{"w": tensor}` as torch writes it: `_rebuild_tensor_v2(storage, offset, size, stride, False, ())`.
    fn state_dict_pickle(shape: &[usize], stride: &[usize], numel: usize) -> Vec<u8> {
        let mut p = Vec::new();
        let s = |p: &mut Vec<u8>, t: &str| {
            p.push(b'X');
            p.extend((t.len() as u32).to_le_bytes());
            p.extend(t.as_bytes());
        };
        let int = |p: &mut Vec<u8>, v: usize| {
            p.extend([0x8a, 8]);
            p.extend((v as u64).to_le_bytes());
        };
        p.extend(b"\x80\x02}(");
        s(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        s(&mut p, "0");
        s(&mut p, "cpu");
        int(&mut p, numel);
        p.extend(b"tQ");
        int(&mut p, 0);
        for vs in [shape, stride] {
            p.push(b'(');
            vs.iter().for_each(|&v| int(&mut p, v));
            p.push(b't');
        }
        p.extend(b"\x89)tRu.");
        p
    }

    /// A zip of stored entries; `zip64`: every size and offset in the directory through zip64 records.
    fn zip(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let (mut out, mut cd) = (Vec::new(), Vec::new());
        for (name, data) in entries {
            let local = out.len() as u64;
            out.extend(0x0403_4b50u32.to_le_bytes());
            out.extend([0u8; 14]);
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(3u16.to_le_bytes()); // 3 bytes of extra padding, as torch aligns its data
            out.extend(name.as_bytes());
            out.extend([0u8; 3]);
            out.extend(*data);
            cd.extend(0x0201_4b50u32.to_le_bytes());
            cd.extend([0u8; 16]);
            let big = |v: u64| if zip64 { 0xffff_ffffu32 } else { v as u32 };
            cd.extend(big(data.len() as u64).to_le_bytes());
            cd.extend(big(data.len() as u64).to_le_bytes());
            cd.extend((name.len() as u16).to_le_bytes());
            cd.extend((if zip64 { 28u16 } else { 0 }).to_le_bytes());
            cd.extend([0u8; 10]); // comment length, disk, internal and external attributes
            cd.extend(big(local).to_le_bytes());
            cd.extend(name.as_bytes());
            if zip64 {
                cd.extend(1u16.to_le_bytes());
                cd.extend(24u16.to_le_bytes());
                cd.extend((data.len() as u64).to_le_bytes());
                cd.extend((data.len() as u64).to_le_bytes());
                cd.extend(local.to_le_bytes());
            }
        }
        let cd_offset = out.len() as u64;
        out.extend(&cd);
        if zip64 {
            let rec = out.len() as u64;
            out.extend(0x0606_4b50u32.to_le_bytes());
            out.extend(44u64.to_le_bytes());
            out.extend([0u8; 12]);
            out.extend((entries.len() as u64).to_le_bytes());
            out.extend((entries.len() as u64).to_le_bytes());
            out.extend((cd.len() as u64).to_le_bytes());
            out.extend(cd_offset.to_le_bytes());
            out.extend(0x0706_4b50u32.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(rec.to_le_bytes());
            out.extend(1u32.to_le_bytes());
        }
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        let n = if zip64 { 0xffff } else { entries.len() as u16 };
        out.extend([n.to_le_bytes(), n.to_le_bytes()].concat());
        out.extend((if zip64 { 0xffff_ffff } else { cd.len() as u32 }).to_le_bytes());
        out.extend((if zip64 { 0xffff_ffff } else { cd_offset as u32 }).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    fn index(archive: Vec<u8>) -> Result<Vec<(String, TorchTensor)>, String> {
        let src: std::sync::Arc<[u8]> = archive.into();
        read_index(&src)
    }

    #[test]
    fn zip64_directories_are_read() {
        let values: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        for zip64 in [false, true] {
            let pkl = state_dict_pickle(&[2, 3], &[3, 1], 6);
            let archive = zip(&[("archive/data.pkl", &pkl[..]), ("archive/byteorder", &b"little"[..]), ("archive/data/0", &values[..])], zip64);
            let t = index(archive.clone()).unwrap_or_else(|e| panic!("zip64 {zip64}: {e}"));
            assert_eq!(t.len(), 1);
            let (name, t) = &t[0];
            assert_eq!((name.as_str(), t.shape.as_slice(), t.strides.is_none(), t.dtype), ("w", &[2usize, 3][..], true, Dtype::F32));
            assert_eq!(&archive[t.start as usize..t.start as usize + 24], &values[..], "zip64 {zip64}");
        }
    }

    #[test]
    fn duplicate_entry_names_are_refused() {
        let pkl = state_dict_pickle(&[2, 3], &[3, 1], 6);
        let values = [0u8; 24];
        let Err(e) = index(zip(&[("a/data.pkl", &pkl[..]), ("a/data/0", &values[..]), ("a/data/0", &values[..8])], false)) else { panic!("loaded") };
        assert!(e.contains("two entries named \"a/data/0\""), "{e}");
    }

    #[test]
    fn crafted_sizes_are_refused() {
        let values = [0u8; 24];
        // A huge tensor over one element (stride 0), a span past the storage, and sizes that overflow.
        for (shape, stride, numel) in [
            (vec![1usize << 40], vec![0usize], 1usize),
            (vec![2, 3], vec![4, 1], 6),
            (vec![1 << 62, 1 << 62], vec![1, 1], 6),
            (vec![2, 3], vec![3, 1], 1 << 62),
        ] {
            let pkl = state_dict_pickle(&shape, &stride, numel);
            let e = index(zip(&[("a/data.pkl", &pkl[..]), ("a/data/0", &values[..])], false)).unwrap_err();
            assert!(e.contains("does not lie within its storage"), "{shape:?} {stride:?}: {e}");
        }
    }

    #[test]
    fn deep_or_exploding_pickles_end_cleanly() {
        // A million nested tuples: dropped without recursion.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        // More values than a state dict of this size has: refused part way, the nesting built so far
        // dropped without recursion.
        let e = Unpickler::new(&p).run().err().expect("over budget");
        assert!(e.contains("far more values"), "{e}");
        p.truncate(3 + 150_000);
        p.push(b'.');
        drop(Unpickler::new(&p).run().unwrap());
        // A list holding the next, a million deep (built through the memo), and a list inside itself.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..300_000 {
            p.extend(b"]r\x01\x00\x00\x00ah\x00\x30j\x01\x00\x00\x00q\x00");
        }
        p.extend(b"h\x00h\x00a.");
        match Unpickler::new(&p).run() {
            Ok(v) => drop(v),
            Err(e) => assert!(e.contains("far more values"), "{e}"),
        }
        // Doubling through the memo 200 times: shared, not copied.
        let mut p = b"\x80\x02)q\x00".to_vec();
        for _ in 0..200 {
            p.extend(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let e = index(zip(&[("a/data.pkl", &p[..])], false)).unwrap_err();
        assert!(e.contains("no state dict"), "{e}");
        // Megabytes of one-byte pushes: refused within a small multiple of the pickle's size (the
        // cheapest pushes fit the budget and end with the pickle); a larger pickle is not read.
        for op in [b']', b'}', b'(', b')', b'N'] {
            let mut p = b"\x80\x02".to_vec();
            p.extend(std::iter::repeat_n(op, 7 << 20));
            let e = Unpickler::new(&p).run().err().expect("over budget");
            assert!(e.contains("far more values") || (matches!(op, b'(' | b'N') && e.contains("ends early")), "{}: {e}", op as char);
            p.extend(std::iter::repeat_n(op, 2 << 20));
            assert!(Unpickler::new(&p).run().err().expect("too large").contains("too large"));
        }
    }

    /// What real `torch.save` pickles (the committed ones, written by PyTorch) charge per byte:
    /// within the budget's 48 with room to spare, so no real checkpoint comes near it.
    #[test]
    fn real_state_dicts_charge_a_few_bytes_per_pickle_byte() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torch-bin");
        let mut seen = 0;
        for rel in [
            "unet/diffusion_pytorch_model.fp16.bin",
            "vae/diffusion_pytorch_model.bin",
            "clip/pytorch_model.bin",
            "text_encoder/pytorch_model-00001-of-00002.bin",
        ] {
            let bytes = std::fs::read(dir.join(rel)).unwrap();
            let source: &[u8] = &bytes;
            let entries = zip_entries(&source).unwrap();
            let pkl = entries.keys().find(|k| k.ends_with("/data.pkl")).unwrap().clone();
            let pickle = read_entry(&source, &entries[&pkl]).unwrap();
            let mut u = Unpickler::new(&pickle);
            u.run_all().unwrap();
            let charged = (memory_budget(pickle.len()) - u.budget) as f64 / pickle.len() as f64;
            assert!(charged > 2.0 && charged < 30.0, "{rel}: {charged:.1} bytes charged per pickle byte");
            seen += 1;
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn foreign_calls_are_refused_not_run() {
        // pickle.dumps(os.system, protocol 2) called with ('echo',): GLOBAL posix system, REDUCE.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.";
        let e = Unpickler::new(p).run().unwrap_err();
        assert!(e.contains("`posix.system`") && e.contains("not run"), "{e}");
    }
}
