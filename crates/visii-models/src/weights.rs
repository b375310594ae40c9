//! Safetensors weights (and PyTorch `.bin` checkpoints, [`crate::torch`]) from bytes (the browser has
//! no files) or files, looked up by the checkpoints' own tensor names, converted from f32 / f16 / bf16
//! to f32 tensors on a device.
//!
//! Naming variants between 2023 checkpoints and today's writers are handled by *aliases*: when a name
//! is missing, each alias rule `(from, to)` is tried by replacing `from` with `to` once.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorInfo};
use visii_formats::source::{ByteSource, DiskFile};

use crate::error::{ModelError, Result};

/// One safetensors file: its parsed header and where its bytes come from. Tensors are read one at
/// a time, by range, when they are loaded (see [`crate::source`]).
#[derive(Clone)]
pub struct WeightFile {
    name: String,
    source: Arc<dyn ByteSource>,
    data_start: usize,
    /// Shapes are the logical ones (a 4-bit tensor's real shape, not its packed byte count).
    tensors: HashMap<String, TensorInfo>,
    /// Names of 4-bit packed tensors.
    packed4: std::collections::HashSet<String>,
    /// Tensors of a PyTorch checkpoint stored as non-contiguous views: their `data_offsets` cover
    /// the span they lie in, gathered into row-major order when read.
    strided: HashMap<String, crate::torch::TorchTensor>,
}

impl WeightFile {
    /// Parse a safetensors buffer held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Result<Self> {
        let bytes: Arc<[u8]> = bytes.into();
        Self::open(name, Arc::new(bytes))
    }

    /// Open a safetensors file from disk (reads the header only).
    pub fn from_path(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = DiskFile::open(path).map_err(|e| ModelError::Io { path: path.display().to_string(), message: e.to_string() })?;
        Self::open(path.display().to_string(), Arc::new(file))
    }

    /// Open a safetensors file from any byte source: reads and checks the header (every tensor's
    /// range must lie in the file and match its dtype and shape), not the tensors.
    pub fn open(name: impl Into<String>, source: Arc<dyn ByteSource>) -> Result<Self> {
        let name = name.into();
        let bad = |message: String| ModelError::BadSafetensors { source_name: name.clone(), message };
        let header = visii_formats::safetensors::read_header(&*source).map_err(&bad)?;
        let data_start = usize::try_from(header.data_start).map_err(|_| bad("the header is beyond what this platform can address".into()))?;
        let mut tensors = header.tensors;
        let mut packed4 = std::collections::HashSet::new();
        // A pack's 4-bit tensors keep their real shape in the metadata (crate::pack).
        let mut shapes = HashMap::new();
        for (mk, mv) in &header.metadata {
            if let Some(name) = mk.strip_prefix(crate::pack::Q4_SHAPE_KEY) {
                let shape: Vec<usize> = serde_json::from_str(mv).map_err(|e| bad(format!("{}: {e}", crate::printable(mk))))?;
                shapes.insert(name.to_string(), shape);
            }
        }
        for (k, shape) in shapes {
            let info = tensors.get_mut(&k).ok_or_else(|| bad(format!("metadata names a 4-bit tensor {k} the file does not have")))?;
            let n4 = visii_formats::safetensors::numel(&shape);
            if info.dtype != Dtype::U8 || n4.is_none() || visii_formats::safetensors::numel(&info.shape) != n4.map(|n| n.div_ceil(2)) {
                return Err(bad(format!("tensor {k}: {:?} {:?} cannot hold 4-bit values of shape {shape:?}", info.dtype, info.shape)));
            }
            info.shape = shape;
            packed4.insert(k);
        }
        Ok(Self { name, source, data_start, tensors, packed4, strided: HashMap::new() })
    }

    /// Open a PyTorch checkpoint (`pytorch_model.bin`, `diffusion_pytorch_model.bin`: the zip
    /// archive `torch.save` writes) from any byte source: its pickle is read (never run, see
    /// [`crate::torch`]) into the same index of byte ranges a safetensors header gives.
    pub fn open_torch(name: impl Into<String>, source: Arc<dyn ByteSource>) -> Result<Self> {
        let name = name.into();
        let bad = |message: String| ModelError::BadTorchFile { source_name: name.clone(), message };
        let index = crate::torch::read_index(&*source).map_err(bad)?;
        let mut tensors = HashMap::new();
        let mut strided = HashMap::new();
        for (k, t) in index {
            let beyond = || bad(format!("tensor {k} lies beyond what this platform can address"));
            let a = usize::try_from(t.start).map_err(|_| beyond())?;
            let b = t.span().checked_mul(t.dtype.bitsize() / 8).and_then(|n| a.checked_add(n)).ok_or_else(beyond)?;
            tensors.insert(k.clone(), TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (a, b) });
            if t.strides.is_some() {
                strided.insert(k, t);
            }
        }
        Ok(Self { name, source, data_start: 0, tensors, packed4: Default::default(), strided })
    }

    /// Names of all tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// A tensor's stored bytes.
    pub fn raw(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            source_name: self.name.clone(),
            name: name.into(),
            expected: vec![],
        })?;
        let (a, b) = info.data_offsets;
        visii_formats::source::READ_STATS.record(b - a);
        let bytes = self
            .source
            .read_at((self.data_start + a) as u64, b - a)
            .map_err(|e| ModelError::Io { path: format!("{} ({name})", self.name), message: e })?;
        Ok(match self.strided.get(name) {
            Some(t) => t.gather(&bytes),
            None => bytes,
        })
    }

    /// The tensor's values as f32, whatever float dtype it is stored in.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            source_name: self.name.clone(),
            name: name.into(),
            expected: vec![],
        })?;
        let raw = self.raw(name)?;
        let raw = &raw[..];
        if self.packed4.contains(name) {
            let scales = self.read_f32(&format!("{name}{}", crate::pack::Q4_SCALE_SUFFIX))?;
            let n: usize = info.shape.iter().product();
            if scales.is_empty() || raw.len() != n.div_ceil(2) || n % scales.len() != 0 {
                return Err(ModelError::BadSafetensors {
                    source_name: self.name.clone(),
                    message: format!("{name}: {} scales for {n} 4-bit values in {} bytes", scales.len(), raw.len()),
                });
            }
            return Ok(crate::pack::dequantise4(raw, &scales, n));
        }

        let out = match info.dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            // A pack's int8 tensor: one f32 scale per block of contiguous values (crate::pack).
            Dtype::I8 => {
                let scales = self.read_f32(&format!("{name}{}", crate::pack::SCALE_SUFFIX)).map_err(|_| ModelError::UnsupportedDtype {
                    source_name: self.name.clone(),
                    name: name.into(),
                    dtype: "I8 without scales".into(),
                })?;
                if scales.is_empty() || raw.len() % scales.len() != 0 {
                    return Err(ModelError::BadSafetensors {
                        source_name: self.name.clone(),
                        message: format!("{name}: {} scales for {} values", scales.len(), raw.len()),
                    });
                }
                let block = raw.len() / scales.len();
                raw.iter().enumerate().map(|(i, &b)| (b as i8) as f32 * scales[i / block]).collect()
            }
            other => return Err(ModelError::UnsupportedDtype { source_name: self.name.clone(), name: name.into(), dtype: format!("{other:?}") }),
        };
        Ok(out)
    }
}

/// The weights of one component (possibly split over several files), with alias rules, usage
/// tracking (to find tensors the architecture did not consume) and a parameter count.
pub struct Weights {
    files: Vec<WeightFile>,
    /// Synthetic weights (benchmarks, full-size configs without a checkpoint): seed and a counter.
    random: Option<(u64, RefCell<u64>)>,
    aliases: Vec<(String, String)>,
    used: RefCell<BTreeSet<String>>,
    params: RefCell<usize>,
    device: Device,
    /// Keep large weights int8 on the device ([`crate::resident`]), converted block by block as
    /// the model is built so the f32 copy never exists whole; values converted so far.
    resident_q8: bool,
    resident_values: RefCell<usize>,
}

impl Weights {
    pub fn new(files: Vec<WeightFile>, device: &Device) -> Self {
        Self {
            files,
            random: None,
            aliases: vec![],
            used: RefCell::new(BTreeSet::new()),
            params: RefCell::new(0),
            device: device.clone(),
            resident_q8: false,
            resident_values: RefCell::new(0),
        }
    }

    /// Build the model with its large weights int8 on the device (see [`crate::resident`]).
    pub fn with_resident_q8(mut self, on: bool) -> Self {
        self.resident_q8 = on;
        self
    }

    /// A freshly built part of the model, with its large weights made int8 when asked for.
    pub fn block<M: burn::module::Module>(&self, m: M) -> M {
        if !self.resident_q8 {
            return m;
        }
        let (m, values) = crate::resident::resident_q8(m);
        *self.resident_values.borrow_mut() += values;
        // The block's f32 weights are free now: hand their pages back, or the allocator keeps
        // them reserved (measured: 5.7 GB held for 1.7 GB of int8 networks in a browser tab).
        self.device.memory_cleanup();
        m
    }

    /// Weight values kept int8 on the device so far.
    pub fn resident_values(&self) -> usize {
        *self.resident_values.borrow()
    }

    /// Random weights of whatever shapes the config asks for: uniform in +-1/sqrt(fan_in) for
    /// matrices and kernels, 1 for norm scales, 0 for biases. For benchmarks and memory
    /// measurements of full-size configs; never for results.
    pub fn random(seed: u64, device: &Device) -> Self {
        let mut w = Self::new(vec![], device);
        w.random = Some((seed, RefCell::new(0)));
        w
    }

    fn random_values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let (seed, counter) = self.random.as_ref().expect("random weights");
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            let v = if name.ends_with("weight") && !name.contains("embedding") { 1.0 } else { 0.0 };
            return vec![v; n];
        }
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let bound = if name.contains("embedding") { 1.0 } else { 1.0 / (fan_in as f32).sqrt() };
        let mut c = counter.borrow_mut();
        *c += 1;
        let mut state = seed ^ (*c).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        (0..n)
            .map(|_| {
                // xorshift64*: cheap and good enough for synthetic weights.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                (r as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    }

    /// Add a naming-variant rule: when `name` is missing, try `name` with `from` replaced by `to`.
    pub fn with_alias(mut self, from: &str, to: &str) -> Self {
        self.aliases.push((from.into(), to.into()));
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Root builder (empty prefix).
    pub fn root(&self) -> Vb<'_> {
        Vb { w: self, prefix: String::new() }
    }

    fn source_name(&self) -> String {
        self.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(" + ")
    }

    /// Find `name` (or an alias of it): the file holding it and the name it has there.
    fn locate(&self, name: &str) -> Option<(&WeightFile, String)> {
        let mut candidates = vec![name.to_string()];
        for (from, to) in &self.aliases {
            if name.contains(from.as_str()) {
                candidates.push(name.replacen(from.as_str(), to, 1));
            }
        }
        for c in candidates {
            if let Some(f) = self.files.iter().find(|f| f.tensors.contains_key(&c)) {
                return Some((f, c));
            }
        }
        None
    }

    /// Whether a tensor of this name (or an alias) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.locate(name).is_some()
    }

    /// Load a tensor as f32 values, checking its shape; `shape` may differ only by trailing 1s
    /// (e.g. a 1x1 conv stored for a linear layer) when the element count matches.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if self.random.is_some() {
            let v = self.random_values(name, shape);
            *self.params.borrow_mut() += v.len();
            return Ok(v);
        }
        let (file, found_name) = self.locate(name).ok_or_else(|| ModelError::MissingTensor {
            source_name: self.source_name(),
            name: name.into(),
            expected: shape.to_vec(),
        })?;
        let found = &file.tensors[&found_name].shape;
        let is4 = file.packed4.contains(&found_name);
        let squeeze = |s: &[usize]| -> Vec<usize> {
            let mut v = s.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if found.as_slice() != shape && squeeze(found) != squeeze(shape) {
            return Err(ModelError::ShapeMismatch {
                source_name: file.name.clone(),
                name: found_name,
                found: found.clone(),
                expected: shape.to_vec(),
            });
        }
        let v = file.read_f32(&found_name)?;
        self.used.borrow_mut().insert(format!("{found_name}{}", if is4 { crate::pack::Q4_SCALE_SUFFIX } else { crate::pack::SCALE_SUFFIX }));
        self.used.borrow_mut().insert(found_name);
        *self.params.borrow_mut() += v.len();
        Ok(v)
    }

    /// Load a tensor onto the device, into a buffer of its own size (see [`persistent`]).
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let v = self.values(name, &shape)?;
        Ok(persistent(&self.device, TensorData::new(v, shape), |data, device| Tensor::from_data(data, device)))
    }

    /// Number of parameters loaded so far.
    pub fn param_count(&self) -> usize {
        *self.params.borrow()
    }

    /// Error on any tensor that was not consumed, except those `ignore` accepts (known buffers, or
    /// parts of a file that another component uses).
    pub fn finish(&self, component: &str, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.borrow();
        for f in &self.files {
            let mut names: Vec<&String> = f.tensors.keys().collect();
            names.sort();
            for n in names {
                if !used.contains(n) && !ignore(n) {
                    return Err(ModelError::UnexpectedTensor { source_name: f.name.clone(), name: n.clone(), component: component.into() });
                }
            }
        }
        Ok(())
    }
}

/// A prefix into [`Weights`], as in the state-dict path (`down_blocks.0.resnets.1`).
#[derive(Clone)]
pub struct Vb<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// Descend one path segment.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() { segment.to_string() } else { format!("{}.{}", self.prefix, segment) };
        Vb { w: self.w, prefix }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.into()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        self.w.tensor(&self.path(name), shape)
    }

    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.w.values(&self.path(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&self.path(name))
    }

    pub fn device(&self) -> &Device {
        self.w.device()
    }

    /// The state-dict path this builder points at.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// `make(input, device)` with what it allocates on the device in buffers of exactly the size asked
/// for, outside the pools activations come and go in: for weights, which live as long as the model.
/// In a browser burn gives every allocation a buffer from size buckets (up to ~1.6x the size asked
/// for), and a free buffer of a larger bucket serves a smaller request: a weight landing on a
/// large activation's old buffer kept it for the model's life (measured: 4.7 GB held for 1.7 GB of
/// int8 weights after a full-size load).
pub fn persistent<I: Send, O: Send>(device: &Device, input: I, make: impl Fn(I, &Device) -> O + Send) -> O {
    let d = device.clone();
    device.memory_persistent_allocations(input, move |i| make(i, &d))
}
