//! The wasm-bindgen facade of visii: the only Rust that knows about JS. It runs inside the page's
//! Web Worker (web/worker.js), which owns this module and the GPU. Everything it computes is the
//! same `visii-pipeline` code the CLI runs, on burn's WebGPU backend, with non-blocking readbacks.
//!
//! JS surface (see web/worker.js): `createEngine()` -> `Engine` with `loadIp2p(name, files)`,
//! `loadClip(name, files)`, `learn(befores, afters, options, onProgress)`, `apply(image, options,
//! instruction, onProgress)`, `measure(what, size, runs)`, `cancel()`, `modelInfo()`; and
//! `inspectInstruction(bytes)`, `makeZip(names, files)`. It reaches the browser through typed
//! `web-sys` bindings (`Blob`, `FileReaderSync`) and makes files with `gloo-file`, never by looking
//! properties up by name.
//! Errors are JS `Error`s whose `name` says what kind of problem it is (`ImageError`,
//! `InstructionError`, `ForeignModelError`, `ModelError`, `CancelledError`, `OptionsError`, `GpuError`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use visii_models::loader::ClipVisionParts;
use visii_models::{ByteSource, ClipFolder, ClipPreprocessConfig, Files, Ip2pFolder};
use visii_pipeline::caption::CaptionOptions;
use visii_pipeline::instruction::{self, SaveInfo};
use visii_pipeline::learn::{AdamWConfig, LearnOptions};
use visii_pipeline::preview::{LatentPreview, Latents, PreviewSink};
use visii_pipeline::{ApplyOptions, Ip2p, ModelIdentity, Noise, PipelineError, RgbImage};
use wasm_bindgen::prelude::*;

/// Install the panic hook so a Rust panic reaches JS as a readable error.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The app version (the same as the CLI's).
#[wasm_bindgen]
pub fn version() -> String {
    visii_models::version().to_string()
}

fn error(kind: &str, message: impl std::fmt::Display) -> JsValue {
    let e = js_sys::Error::new(&message.to_string());
    e.set_name(kind);
    e.into()
}

/// JSON-like values (maps as objects, `None` as null, u64 as numbers), except that byte buffers
/// (`serde_bytes`) become `Uint8Array`s (the page transfers their buffers between threads).
fn to_js<T: Serialize + ?Sized>(v: &T) -> JsValue {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible().serialize_bytes_as_arrays(false)).unwrap_or(JsValue::NULL)
}

/// An options object that may be left out (`undefined` / `null`: the defaults).
fn optional<T: serde::de::DeserializeOwned + Default>(options: JsValue) -> Result<T, JsValue> {
    if options.is_undefined() || options.is_null() {
        return Ok(T::default());
    }
    serde_wasm_bindgen::from_value(options).map_err(|e| error("OptionsError", e))
}

fn pipeline_error(e: PipelineError) -> JsValue {
    let text = e.to_string();
    let kind = match &e {
        PipelineError::Cancelled => "CancelledError",
        PipelineError::ForeignModel(_) => "ForeignModelError",
        PipelineError::Instruction(_) => "InstructionError",
        PipelineError::Model(_) => "ModelError",
        PipelineError::Gpu(_) => "GpuError",
        _ if text.contains("PNG or JPEG") || text.contains("image") => "ImageError",
        _ => "OptionsError",
    };
    error(kind, text)
}

/// Initialise burn's WebGPU device and run a 2x2 matmul on it; returns the product's four values
/// as JSON text (`[19, 22, 43, 50]` when the GPU path works).
#[wasm_bindgen(js_name = gpuSelftest)]
pub async fn gpu_selftest() -> Result<String, JsValue> {
    let device = init_device(false).await?;
    let a = Tensor::<2>::from_data(TensorData::new(vec![1f32, 2., 3., 4.], [2, 2]), &device);
    let b = Tensor::<2>::from_data(TensorData::new(vec![5f32, 6., 7., 8.], [2, 2]), &device);
    let v = visii_pipeline::read_f32(a.matmul(b)).await.map_err(pipeline_error)?;
    Ok(serde_json::to_string(&v).unwrap_or_default())
}

thread_local! {
    static DEVICE: RefCell<Option<Device>> = const { RefCell::new(None) };
}

/// burn's WebGPU device, made once. `spec_limits`: request the device with the WebGPU spec's
/// default buffer limits (128 MiB bindings, 256 MiB buffers), as the least capable adapter would
/// grant; otherwise cubecl requests the adapter's own limits.
async fn init_device(spec_limits: bool) -> Result<Device, JsValue> {
    if let Some(d) = DEVICE.with(|d| d.borrow().clone()) {
        return Ok(d);
    }
    let gpu = |e: String| error("GpuError", format!("WebGPU initialisation failed: {e}"));
    let d = if spec_limits {
        use visii_models::gpu::{capped_device, SPEC_BUFFER, SPEC_STORAGE_BINDING};
        capped_device(burn::tensor::wgpu::wgpu::Backends::BROWSER_WEBGPU, SPEC_STORAGE_BINDING, SPEC_BUFFER, false).await.map_err(gpu)?
    } else {
        Device::wgpu_options().init_async().await.map_err(|e| gpu(e.to_string()))?
    };
    DEVICE.with(|slot| *slot.borrow_mut() = Some(d.clone()));
    Ok(d)
}

/// Synchronous ranged read of a `Blob` / `File` (OPFS or picked) with `FileReaderSync` (only in
/// workers): `new FileReaderSync().readAsArrayBuffer(blob.slice(offset, offset + len))`.
fn read_blob(blob: &web_sys::Blob, offset: f64, len: f64) -> Result<js_sys::Uint8Array, JsValue> {
    let reader = web_sys::FileReaderSync::new().map_err(|_| error("ModelError", "FileReaderSync is not available here (stored files are read in the worker)"))?;
    let part = blob.slice_with_f64_and_f64(offset, offset + len)?;
    Ok(js_sys::Uint8Array::new(&reader.read_as_array_buffer(&part)?.into()))
}

/// The message of a JS exception (an `Error`'s `message`, else how it prints).
fn js_message(e: &JsValue) -> String {
    match e.dyn_ref::<js_sys::Error>() {
        Some(e) => String::from(e.message()),
        None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
    }
}

/// A `Blob` read by range: model files stay in storage, only the tensor being loaded is copied
/// into wasm memory.
struct BlobSource {
    blob: web_sys::Blob,
    len: u64,
}

// SAFETY: wasm32 without atomics is single-threaded; the value never leaves the worker's thread.
unsafe impl Send for BlobSource {}
unsafe impl Sync for BlobSource {}

impl ByteSource for BlobSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let a = read_blob(&self.blob, offset as f64, len as f64).map_err(|e| js_message(&e))?;
        if a.length() as usize != len {
            return Err(format!("read {} of {len} bytes at {offset}: the stored file changed or is truncated", a.length()));
        }
        Ok(a.to_vec())
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PackOpts {
    quant: Option<String>,
    clip_quant: Option<String>,
    shard_mb: Option<usize>,
}

/// Convert stored model files (the fp16 checkpoints, `Map`s of path -> `File` as for `loadIp2p` /
/// `loadClip`) into a weight pack, tensor by tensor: `onFile(path, bytes, doneTensors,
/// totalTensors)` is called for each finished file (shards of at most `shardMb`, default 64 MB,
/// then indexes and `manifest.json` last) and may return a Promise (it is awaited, so files are
/// written before the next is made: the wasm heap holds one shard). `options`: `{ quant: "q8",
/// clipQuant: "q4", shardMb: 64 }`. Resolves to `{ tensors, params, bytes, shards, fingerprint }`.
#[wasm_bindgen(js_name = convertPack)]
pub async fn convert_pack(ip2p: js_sys::Map, clip: js_sys::Map, options: JsValue, on_file: js_sys::Function) -> Result<JsValue, JsValue> {
    use visii_models::pack::{PackConverter, Quant};
    let o: PackOpts = optional(options)?;
    let quant: Quant = o.quant.as_deref().unwrap_or("q8").parse().map_err(|e| error("OptionsError", e))?;
    let clip_quant: Quant = match o.clip_quant.as_deref() {
        Some(q) => q.parse().map_err(|e| error("OptionsError", e))?,
        None => quant.default_clip(),
    };
    let ip = Ip2pFolder::from_files(files_from("model", &ip2p)).map_err(|e| error("ModelError", e))?;
    let cf = ClipFolder::from_files(files_from("clip", &clip)).map_err(|e| error("ModelError", e))?;
    let mut c = PackConverter::new(&ip, &cf, quant, clip_quant, o.shard_mb.unwrap_or(64)).map_err(|e| error("ModelError", e))?;
    while let Some((path, bytes)) = c.next_file().map_err(|e| error("ModelError", e))? {
        let arr = js_sys::Uint8Array::from(&bytes[..]);
        drop(bytes);
        let args = js_sys::Array::of4(&path.into(), &arr, &(c.done_tensors as f64).into(), &(c.total_tensors as f64).into());
        let r = on_file.apply(&JsValue::NULL, &args)?;
        if let Ok(p) = r.dyn_into::<js_sys::Promise>() {
            wasm_bindgen_futures::JsFuture::from(p).await?;
        }
    }
    Ok(to_js(&c.report()))
}

/// Streaming sha256 (WebCrypto digests only whole buffers), for verifying stored model files.
#[wasm_bindgen]
pub struct Sha256(sha2::Sha256);

#[wasm_bindgen]
impl Sha256 {
    #[wasm_bindgen(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Sha256 {
        use sha2::Digest;
        Sha256(sha2::Sha256::new())
    }
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        self.0.update(data);
    }
    /// Lowercase hex digest.
    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Of a model folder picked on this computer (`files`: a `Map` of relative path -> `File`; `kind`:
/// "ip2p" or "clip"), the paths loading reads: what the page copies into storage
/// (`visii_models::loader::needed_files`: not the single-file checkpoint, other formats or `.git`).
#[wasm_bindgen(js_name = neededFiles)]
pub fn needed_files(kind: &str, files: js_sys::Map) -> Vec<String> {
    use visii_models::loader::{CLIP_WEIGHTS, IP2P_WEIGHTS};
    let components: &[(&str, &str)] = if kind == "clip" { &CLIP_WEIGHTS } else { &IP2P_WEIGHTS };
    let paths: Vec<String> = files.keys().into_iter().filter_map(|k| Some(k.ok()?.as_string()?.trim_start_matches("./").to_string())).collect();
    visii_models::loader::needed_files(&files_from(kind, &files), &paths, components)
}

/// Model files from JS: a `Map` of relative path -> `Blob`/`File` (read by range) or `Uint8Array`.
fn files_from(name: &str, files: &js_sys::Map) -> Files {
    let mut map: HashMap<String, Arc<dyn ByteSource>> = HashMap::new();
    files.for_each(&mut |value, key| {
        let Some(k) = key.as_string() else { return };
        let k = k.trim_start_matches("./").to_string();
        if let Some(v) = value.dyn_ref::<js_sys::Uint8Array>() {
            // One copy, straight from JS memory into the buffer the loader reads.
            let mut buf = Arc::<[u8]>::new_uninit_slice(v.length() as usize);
            v.copy_to_uninit(Arc::get_mut(&mut buf).expect("a new Arc is unique"));
            // SAFETY: copy_to_uninit initialised every byte.
            map.insert(k, Arc::new(unsafe { buf.assume_init() }));
        } else if let Some(blob) = value.dyn_ref::<web_sys::Blob>() {
            // A `File` is a `Blob`; its size is what storage holds now (a read past it is refused).
            map.insert(k, Arc::new(BlobSource { blob: blob.clone(), len: blob.size() as u64 }));
        }
    });
    Files::sources(name, map)
}

struct Clip {
    parts: ClipVisionParts,
    pre: ClipPreprocessConfig,
}

/// The `{ resident: "f32" | "q8" }` option of `loadIp2p` / `loadClip`: whether the large weights
/// stay int8 on the GPU.
fn resident_q8(options: JsValue) -> Result<bool, JsValue> {
    #[derive(Deserialize, Default)]
    struct LoadOptions {
        resident: Option<String>,
    }
    let o: LoadOptions = optional(options)?;
    match o.resident.as_deref() {
        None | Some("f32") => Ok(false),
        Some("q8") => Ok(true),
        Some(other) => Err(error("OptionsError", format!("resident must be \"f32\" or \"q8\", not {other:?}"))),
    }
}

/// The `{ activations: "f32" | "f16" }` option of `loadIp2p`: whether the UNet's activations run in
/// f16 (adapters with `shader-f16`).
fn f16_activations(options: JsValue) -> Result<bool, JsValue> {
    #[derive(Deserialize, Default)]
    struct LoadOptions {
        activations: Option<String>,
    }
    let o: LoadOptions = optional(options)?;
    match o.activations.as_deref() {
        None | Some("f32") => Ok(false),
        Some("f16") => Ok(true),
        Some(other) => Err(error("OptionsError", format!("activations must be \"f32\" or \"f16\", not {other:?}"))),
    }
}

/// The loaded networks and the cancel flag.
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    /// The model and its identity, replaced together.
    ip2p: RefCell<Option<(Rc<Ip2p>, ModelIdentity)>>,
    clip: RefCell<Option<Rc<Clip>>>,
    /// The loaded VAE's latent -> RGB map for live previews (fitted at load; none if the fit failed).
    preview: RefCell<Option<Rc<LatentPreview>>>,
    cancel: Rc<Cell<bool>>,
    busy: Rc<Cell<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct EngineOpts {
    /// `"adapter"` (default): the adapter's own limits; `"spec"`: the WebGPU default limits.
    limits: Option<String>,
    /// Hand the allocator's free buffers back every N layers inside a step (default 0: only
    /// between steps, `visii_models::memory::TIDY_EVERY`).
    tidy_every: Option<usize>,
    /// The same inside the backward pass through int8 weights (default 0: never, see
    /// `visii_models::memory::TIDY_BACKWARD_EVERY`).
    tidy_backward_every: Option<usize>,
    /// Run each learning step in buffers of exactly the size asked for (default true,
    /// `visii_models::memory::EXACT_FIT`); false: the allocator's size buckets.
    exact_fit: Option<bool>,
    /// The adapter is SwiftShader or another fallback adapter: our GEMM then uses its small
    /// shapes (`visii_models::kernels::set_cpu_adapter`). The worker reads it off the adapter's
    /// info; absent, the adapter's name decides.
    cpu_adapter: Option<bool>,
    /// `"ours"` (default) or `"burn"`: whose conv / matmul / norm kernels run (for comparisons).
    kernels: Option<String>,
    /// The skinny GEMM (default off in a browser for now: `visii_models::kernels::skinny_enabled`),
    /// its use for a Linear's input gradient, the fused attention (default on), its autodiff step in
    /// learning (default on, `visii_models::fused`), and learning's fused norm and GEGLU steps
    /// (default on); for diagnosis and comparisons.
    gemv: Option<bool>,
    gemv_grad: Option<bool>,
    flash: Option<bool>,
    flash_grad: Option<bool>,
    fused_steps: Option<bool>,
    /// Whether layers add their residual (and in learning their bias) in their GEMM's epilogue
    /// (default on, `visii_models::kernels::epilogue_enabled`); false: burn's adds, to compare.
    epilogue: Option<bool>,
    /// Whether our GEMMs read int8-resident weights in place (default on,
    /// `visii_models::kernels::q8_enabled`); false: a float copy of each layer's weight first, to
    /// compare.
    q8: Option<bool>,
}

/// Create the engine (initialises WebGPU). `options`: `{ limits: "adapter" | "spec", tidyEvery?,
/// tidyBackwardEvery?, exactFit?, cpuAdapter?, kernels?, gemv?, gemvGrad?, flash?, flashGrad?, fusedSteps?, epilogue?, q8? }` (tidy* and exactFit: how often free GPU buffers are handed back, and
/// whether steps run in exact-size buffers; for diagnosis). The models
/// keep every buffer they create on purpose within 128 MiB either way
/// (`visii_models::nn::max_buffer_bytes`).
#[wasm_bindgen(js_name = createEngine)]
pub async fn create_engine(options: JsValue) -> Result<Engine, JsValue> {
    let o: EngineOpts = optional(options)?;
    let spec = match o.limits.as_deref() {
        None | Some("adapter") => false,
        Some("spec") => true,
        Some(other) => return Err(error("OptionsError", format!("limits must be \"adapter\" or \"spec\", not {other:?}"))),
    };
    visii_models::memory::tidy_every(o.tidy_every.unwrap_or(visii_models::memory::TIDY_EVERY));
    visii_models::memory::tidy_backward_every(o.tidy_backward_every.unwrap_or(visii_models::memory::TIDY_BACKWARD_EVERY));
    visii_models::memory::exact_fit_steps(o.exact_fit.unwrap_or(visii_models::memory::EXACT_FIT));
    if let Some(cpu) = o.cpu_adapter {
        visii_models::kernels::set_cpu_adapter(cpu);
    }
    match o.kernels.as_deref() {
        None | Some("ours") => visii_models::kernels::set_enabled(true),
        Some("burn") => visii_models::kernels::set_enabled(false),
        Some(other) => return Err(error("OptionsError", format!("kernels must be \"ours\" or \"burn\", not {other:?}"))),
    }
    if let Some(on) = o.gemv {
        visii_models::kernels::set_skinny(on);
    }
    if let Some(on) = o.gemv_grad {
        visii_models::kernels::set_skinny_grad(on);
    }
    if let Some(on) = o.flash {
        visii_models::kernels::set_flash(on);
    }
    if let Some(on) = o.flash_grad {
        visii_models::fused::set_enabled(on);
    }
    if let Some(on) = o.fused_steps {
        visii_models::fused::set_steps_enabled(on);
    }
    if let Some(on) = o.epilogue {
        visii_models::kernels::set_epilogue(on);
    }
    if let Some(on) = o.q8 {
        visii_models::kernels::set_q8(on);
    }
    Ok(Engine {
        device: init_device(spec).await?,
        ip2p: RefCell::new(None),
        clip: RefCell::new(None),
        preview: RefCell::new(None),
        cancel: Rc::new(Cell::new(false)),
        busy: Rc::new(Cell::new(false)),
    })
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct LearnOpts {
    steps: Option<usize>,
    size: Option<usize>,
    seed: Option<u64>,
    patience: Option<usize>,
    lr: Option<f64>,
    /// Initial caption; empty or absent: searched automatically.
    init: Option<String>,
    caption_iterations: Option<usize>,
    /// Free-form fields stored in the file (e.g. `createdAt`).
    created_at: Option<String>,
    /// A live preview every this many steps (default 1; 0: none).
    preview_every: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ApplyOpts {
    steps: Option<usize>,
    guidance: Option<f32>,
    image_guidance: Option<f32>,
    seed: Option<u64>,
    /// Longer side of the working size.
    size: Option<usize>,
    prompt: Option<String>,
    extra: Option<String>,
    reuse_noise: bool,
    allow_foreign_model: bool,
    /// A live preview every this many steps (default 1; 0: none).
    preview_every: Option<usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Progress<'a> {
    phase: &'a str,
    step: usize,
    total: usize,
    t: Option<usize>,
    mse: Option<f32>,
    cos: Option<f32>,
    loss: Option<f32>,
    best: Option<f32>,
}

fn report(f: &js_sys::Function, p: &Progress) -> bool {
    let v = to_js(p);
    // A callback that returns `false` asks to stop.
    !matches!(f.call1(&JsValue::NULL, &v), Ok(r) if r == JsValue::FALSE)
}

/// A live preview to `f`: `{phase: "preview", of, step, total, width, height, rgba: Uint8ClampedArray,
/// latentSum}` (one pixel per latent pixel, the page scales it up; `latentSum`: the sum of the
/// predicted latent's values, which changes at every step even where the 8-bit image does not).
/// Returning `false` asks to stop.
fn report_preview(f: &js_sys::Function, of: &str, step: usize, total: usize, img: &RgbImage, z: &Latents) -> bool {
    let mut rgba = Vec::with_capacity(img.width * img.height * 4);
    for px in img.data.chunks_exact(3) {
        rgba.extend_from_slice(&[px[0], px[1], px[2], 255]);
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Preview<'a> {
        phase: &'static str,
        of: &'a str,
        step: usize,
        total: usize,
        width: usize,
        height: usize,
        rgba: serde_bytes::ByteBuf,
        latent_sum: f64,
    }
    let o = to_js(&Preview {
        phase: "preview",
        of,
        step,
        total,
        width: img.width,
        height: img.height,
        rgba: serde_bytes::ByteBuf::from(rgba),
        latent_sum: z.values.iter().map(|&v| v as f64).sum(),
    });
    !matches!(f.call1(&JsValue::NULL, &o), Ok(r) if r == JsValue::FALSE)
}

fn decode_image(bytes: &[u8], what: &str) -> Result<RgbImage, JsValue> {
    RgbImage::decode(bytes).map_err(|e| error("ImageError", format!("the {what} is not an image this app can read ({e})")))
}

struct BusyGuard(Rc<Cell<bool>>);
impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

#[wasm_bindgen]
impl Engine {
    /// Load InstructPix2Pix from its diffusers-layout files (`Map` of relative path -> bytes).
    /// Returns `{ name, fingerprint, hiddenSize, unetParams, vaeParams, textParams, bytesRead, largestRead,
    /// residentInt8Values, activations, gpuBytesInUse, gpuBytesReserved }` (what this engine's allocator holds on
    /// the GPU: in use by every loaded network, and reserved including free pages kept for reuse).
    /// `options`: `{ resident: "f32" | "q8", activations: "f32" | "f16" }` — `"q8"` keeps the large
    /// weights of the UNet, the VAE and the text encoder's layers int8 on the GPU (a scale per 32
    /// values, dequantised per layer as it runs, in learning's backward pass too): about 3.5x less
    /// GPU memory for them, a little slower; `"f16"` runs the UNet's activations in f16 (a GPU
    /// with `shader-f16`; refused with an OptionsError elsewhere, before anything is loaded).
    #[wasm_bindgen(js_name = loadIp2p)]
    pub async fn load_ip2p(&self, name: String, files: js_sys::Map, options: JsValue) -> Result<JsValue, JsValue> {
        self.idle()?;
        let f16 = f16_activations(options.clone())?;
        let q8 = resident_q8(options)?;
        // Refused before anything is read (the model loaded now stays).
        visii_models::unet::check_f16(f16, &self.device).map_err(|e| error("OptionsError", e))?;
        let folder = Ip2pFolder::from_files(files_from(&name, &files)).map_err(|e| error("ModelError", e))?.with_resident_q8(q8);
        visii_models::READ_STATS.reset();
        let mut model = Ip2p::from_folder(&folder, &self.device).map_err(|e| error("ModelError", e))?;
        model.unet.set_f16_activations(f16, &self.device).map_err(|e| error("OptionsError", e))?;
        // Files are read by range, one tensor at a time: the largest single read is one tensor.
        let (read_total, read_largest) = visii_models::READ_STATS.get();
        let id = ModelIdentity::of_async(&model).await.map_err(pipeline_error)?;
        // Previews are a help, not a need: a VAE the fit fails on loads without them.
        let preview = LatentPreview::fit_async(&model).await.ok().map(Rc::new);
        // The identity's readback has waited for every upload and conversion: what loading used
        // on the side (f32 weights before their int8 conversion) can go back now.
        visii_pipeline::release_free_memory(&self.device);
        let [up, vp, tp] = model.params;
        let pool = self.device.memory_pool_usage();
        let info = serde_json::json!({
            "name": id.name, "fingerprint": id.fingerprint(), "hiddenSize": model.hidden_size(),
            "unetParams": up, "vaeParams": vp, "textParams": tp,
            "bytesRead": read_total, "largestRead": read_largest, "residentInt8Values": model.resident_values,
            "activations": if f16 { "f16" } else { "f32" },
            "previewFitRmse": preview.as_ref().map(|p| p.fit_rmse),
            "gpuBytesInUse": pool.as_ref().map(|u| u.bytes_in_use), "gpuBytesReserved": pool.map(|u| u.bytes_reserved),
        });
        // A learn or apply may have started while the identity was read back.
        self.idle()?;
        *self.ip2p.borrow_mut() = Some((Rc::new(model), id));
        *self.preview.borrow_mut() = preview;
        Ok(to_js(&info))
    }

    /// Load the CLIP vision tower and projections from a transformers `CLIPModel` layout.
    /// `options`: `{ resident: "f32" | "q8" }` as for `loadIp2p` (the vision tower's layers).
    #[wasm_bindgen(js_name = loadClip)]
    pub fn load_clip(&self, name: String, files: js_sys::Map, options: JsValue) -> Result<JsValue, JsValue> {
        self.idle()?;
        let q8 = resident_q8(options)?;
        let folder = ClipFolder::from_files(files_from(&name, &files)).map_err(|e| error("ModelError", e))?.with_resident_q8(q8);
        let loaded = folder.vision(&self.device).map_err(|e| error("ModelError", e))?;
        let pre = folder.preprocess_config().map_err(|e| error("ModelError", e))?;
        let info = serde_json::json!({"name": name, "params": loaded.params, "residentInt8Values": loaded.resident_values});
        *self.clip.borrow_mut() = Some(Rc::new(Clip { parts: loaded.model, pre }));
        Ok(to_js(&info))
    }

    /// Ask the running learn / apply to stop after its current step.
    pub fn cancel(&self) {
        self.cancel.set(true);
    }

    /// Refuse to replace a model while a learn or apply uses it.
    fn idle(&self) -> Result<(), JsValue> {
        if self.busy.get() {
            return Err(error("OptionsError", "a learn or apply is running: stop it before loading another model"));
        }
        Ok(())
    }

    fn begin(&self) -> Result<(Rc<Ip2p>, ModelIdentity, BusyGuard), JsValue> {
        if self.busy.get() {
            return Err(error("OptionsError", "another learn or apply is still running"));
        }
        let (model, id) = self.ip2p.borrow().clone().ok_or_else(|| error("ModelError", "no model is loaded yet"))?;
        self.busy.set(true);
        self.cancel.set(false);
        Ok((model, id, BusyGuard(self.busy.clone())))
    }

    /// Learn an instruction from before/after pairs (arrays of image bytes, paired by index).
    /// `onProgress({phase: "caption" | "learn", step, total, t, mse, cos, loss, best})`; returning
    /// `false` from it, or `cancel()`, stops (learning keeps the best instruction so far).
    /// Resolves to the instruction file's bytes.
    pub async fn learn(
        &self,
        befores: js_sys::Array,
        afters: js_sys::Array,
        options: JsValue,
        on_progress: js_sys::Function,
    ) -> Result<js_sys::Uint8Array, JsValue> {
        let (model, identity, _busy) = self.begin()?;
        let clip = self.clip.borrow().clone().ok_or_else(|| error("ModelError", "the CLIP model is not loaded yet"))?;
        let o: LearnOpts = serde_wasm_bindgen::from_value(options).map_err(|e| error("OptionsError", e))?;
        if befores.length() == 0 || befores.length() != afters.length() {
            return Err(error("OptionsError", "give one or more before/after pairs"));
        }
        let mut pairs = vec![];
        for i in 0..befores.length() {
            let b = js_sys::Uint8Array::new(&befores.get(i)).to_vec();
            let a = js_sys::Uint8Array::new(&afters.get(i)).to_vec();
            pairs.push((decode_image(&b, "before image")?, decode_image(&a, "after image")?));
        }
        let size = o.size.unwrap_or(256);
        if !(8..=1024).contains(&size) {
            return Err(error("OptionsError", format!("learning size {size} must be between 8 and 1024")));
        }
        let opts = LearnOptions {
            steps: o.steps.unwrap_or(300).max(1),
            size,
            exact_size: None,
            seed: o.seed.unwrap_or(0),
            patience: o.patience.unwrap_or(100),
            adam: AdamWConfig { lr: o.lr.unwrap_or(1e-3), ..AdamWConfig::default() },
        };
        let cancel = self.cancel.clone();
        let caption = match o.init.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => {
                let target = visii_pipeline::learn::after_target(&clip.parts, &clip.pre, &pairs, &self.device).map_err(pipeline_error)?;
                let copts = CaptionOptions { iterations: o.caption_iterations.unwrap_or(150).max(1), seed: opts.seed, ..CaptionOptions::default() };
                let total = copts.iterations;
                let found = visii_pipeline::caption::auto_caption_async(&model, &clip.parts.text_projection, target, &copts, &mut |i, best| {
                    let p = Progress { phase: "caption", step: i, total, t: None, mse: None, cos: Some(best), loss: None, best: None };
                    report(&on_progress, &p) && !cancel.get()
                })
                .await;
                match found {
                    Ok(c) => c.text,
                    // The search cannot run for this vocabulary / length: start from a neutral prompt.
                    Err(PipelineError::Config(_)) => "a photo".into(),
                    Err(e) => return Err(pipeline_error(e)),
                }
            }
        };
        if cancel.get() {
            return Err(pipeline_error(PipelineError::Cancelled));
        }
        let total = opts.steps;
        let previewer = self.preview.borrow().clone();
        let mut show = |step: usize, z: &Latents| {
            if let Some(img) = previewer.as_ref().and_then(|p| p.render(z).ok()) {
                report_preview(&on_progress, "learn", step + 1, total, &img, z);
            }
        };
        let mut sink = PreviewSink { every: if previewer.is_some() { o.preview_every.unwrap_or(1) } else { 0 }, sink: &mut show };
        let learned = visii_pipeline::learn::learn_async(
            &model,
            &clip.parts,
            &clip.pre,
            &pairs,
            &caption,
            &opts,
            None,
            &mut |s, best| {
                let p = Progress {
                    phase: "learn",
                    step: s.step + 1,
                    total,
                    t: Some(s.t),
                    mse: Some(s.mse),
                    cos: Some(s.cos),
                    loss: Some(s.loss),
                    best: Some(best),
                };
                report(&on_progress, &p) && !cancel.get()
            },
            Some(&mut sink),
        )
        .await
        .map_err(pipeline_error)?;
        let thumb = RgbImage::strip(&[&pairs[0].0, &pairs[0].1], 64).to_png().map_err(pipeline_error)?;
        let mut extra = vec![("hyper_parameters", serde_json::to_string(&opts).unwrap_or_default())];
        if let Some(c) = o.created_at {
            extra.push(("created_at", c));
        }
        let bytes =
            instruction::save(&learned, &SaveInfo { model: &identity, thumbnail_png: Some(&thumb), extra: &extra }).map_err(pipeline_error)?;
        Ok(js_sys::Uint8Array::from(&bytes[..]))
    }

    /// Edit an image with a learned instruction file (`instruction` bytes) or a text `prompt`
    /// (options), optionally with `extra` words (hybrid). Resolves to
    /// `{png: Uint8Array, width, height}`.
    pub async fn apply(
        &self,
        image: js_sys::Uint8Array,
        options: JsValue,
        instruction: Option<js_sys::Uint8Array>,
        on_progress: js_sys::Function,
    ) -> Result<JsValue, JsValue> {
        let (model, id, _busy) = self.begin()?;
        let o: ApplyOpts = serde_wasm_bindgen::from_value(options).map_err(|e| error("OptionsError", e))?;
        let input = decode_image(&image.to_vec(), "image to edit")?;
        let size = o.size.unwrap_or(512);
        if !(8..=2048).contains(&size) {
            return Err(error("OptionsError", format!("output size {size} must be between 8 and 2048")));
        }
        let (w, h) = input.working_size(size);
        let work = input.resized(w, h);
        let opts = ApplyOptions {
            steps: o.steps.unwrap_or(20).clamp(1, 200),
            guidance: o.guidance.unwrap_or(7.5),
            image_guidance: o.image_guidance.unwrap_or(1.5),
            seed: o.seed.unwrap_or(0),
        };
        let mut noise = Noise::Seeded(opts.seed);
        let cond = match instruction {
            Some(bytes) => {
                let (cond, ins) =
                    model.instruction_conditioning(&bytes.to_vec(), &id, o.allow_foreign_model, o.extra.as_deref()).map_err(pipeline_error)?;
                if o.reuse_noise {
                    noise = Noise::Reuse(
                        ins.noise_reuse.clone().ok_or_else(|| error("InstructionError", "this instruction does not record its learning noises"))?,
                    );
                }
                cond
            }
            None => {
                let prompt = o.prompt.unwrap_or_default();
                if prompt.trim().is_empty() {
                    return Err(error("OptionsError", "give an instruction file or a text instruction"));
                }
                model.encode_text(&prompt).map_err(pipeline_error)?
            }
        };
        let cancel = self.cancel.clone();
        let previewer = self.preview.borrow().clone();
        let steps = opts.steps;
        let mut show = |step: usize, z: &Latents| {
            if let Some(img) = previewer.as_ref().and_then(|p| p.render(z).ok()) {
                report_preview(&on_progress, "apply", step + 1, steps, &img, z);
            }
        };
        let mut sink = PreviewSink { every: if previewer.is_some() { o.preview_every.unwrap_or(1) } else { 0 }, sink: &mut show };
        let out = model
            .apply_previewed_async(
                &work,
                cond,
                &opts,
                &noise,
                &mut |i, n| {
                    let p = Progress { phase: "apply", step: i, total: n, t: None, mse: None, cos: None, loss: None, best: None };
                    report(&on_progress, &p) && !cancel.get()
                },
                Some(&mut sink),
            )
            .await
            .map_err(pipeline_error)?;
        let v = visii_pipeline::read_f32(out).await.map_err(pipeline_error)?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(error("GpuError", "the GPU returned invalid values"));
        }
        let png = RgbImage::from_unit_floats(&v, w, h).to_png().map_err(pipeline_error)?;
        #[derive(Serialize)]
        struct Applied {
            png: serde_bytes::ByteBuf,
            width: usize,
            height: usize,
        }
        Ok(to_js(&Applied { png: serde_bytes::ByteBuf::from(png), width: w, height: h }))
    }

    /// Time the loaded UNet on this GPU with random inputs at `size` px (`size / 8` latents):
    /// `what` is `"forward"` (one UNet pass), `"learn-step"` (one learning step: three UNet rows,
    /// the backward pass, the update) or `"sample-step"` (one apply step: three rows): once (which
    /// includes compiling the GPU kernels), then `runs` more times. Resolves to
    /// `{ what, size, firstSeconds, seconds, gpuBytesInUse, gpuBytesReserved, gpuBytesHeldPeak,
    /// gpuBytesInUsePeak }` (`seconds`: the fastest run after the first, or the first when `runs`
    /// is 0; the GPU memory this engine's allocator holds afterwards: in use, and reserved
    /// including pages kept for reuse; and the most it held / had in use during the runs, read at
    /// every layer).
    pub async fn measure(&self, what: String, size: usize, runs: usize) -> Result<JsValue, JsValue> {
        use visii_pipeline::probe::UnetProbe;
        if !(8..=1024).contains(&size) || size % 8 != 0 {
            return Err(error("OptionsError", format!("size {size} must be a multiple of 8 between 8 and 1024")));
        }
        if !["forward", "learn-step", "sample-step"].contains(&what.as_str()) {
            return Err(error("OptionsError", format!("what must be \"forward\", \"learn-step\" or \"sample-step\", not {what:?}")));
        }
        let (model, _, _busy) = self.begin()?;
        let mut probe = UnetProbe::new(&model.unet, model.hidden_size(), size / 8, &self.device).await.map_err(pipeline_error)?;
        let mut times = vec![];
        // What the allocator holds, read at every layer while measuring.
        struct Watch;
        impl Drop for Watch {
            fn drop(&mut self) {
                visii_models::memory::watch(false);
            }
        }
        let _watch = Watch;
        visii_models::memory::watch(true);
        visii_models::memory::take_peak();
        for _ in 0..=runs {
            if self.cancel.get() {
                return Err(error("CancelledError", "stopped"));
            }
            let t = js_sys::Date::now();
            match what.as_str() {
                "forward" => probe.forward(&model.unet).await,
                "learn-step" => probe.learn_step(&model.unet).await,
                _ => probe.sample_step(&model.unet).await,
            }
            .map_err(pipeline_error)?;
            times.push((js_sys::Date::now() - t) / 1000.0);
        }
        let best = if runs == 0 { times[0] } else { times[1..].iter().copied().fold(f64::INFINITY, f64::min) };
        // What the step(s) made the allocator hold, then handed back (as learn and apply do per step).
        let pool = self.device.memory_pool_usage();
        visii_pipeline::release_free_memory(&self.device);
        let peak = visii_models::memory::take_peak();
        Ok(to_js(&serde_json::json!({"what": what, "size": size, "firstSeconds": times[0], "seconds": best,
            "gpuBytesInUse": pool.as_ref().map(|u| u.bytes_in_use), "gpuBytesReserved": pool.map(|u| u.bytes_reserved),
            "gpuBytesHeldPeak": peak.held, "gpuBytesInUsePeak": peak.in_use})))
    }

    /// The vocabulary entries nearest to each learned position of an instruction file, read with the
    /// loaded model's text encoder (see `visii_pipeline::words`): `[[{word, id, score}, ...], ...]`,
    /// one list per position of the learned span, best first, `k` (1..=20) each.
    #[wasm_bindgen(js_name = instructionWords)]
    /// It does not hold the engine: a learn or apply may run meanwhile (both only read the model).
    pub async fn instruction_words(&self, bytes: js_sys::Uint8Array, k: usize) -> Result<JsValue, JsValue> {
        let model = self.ip2p.borrow().as_ref().map(|(m, _)| m.clone()).ok_or_else(|| error("ModelError", "no model is loaded yet"))?;
        let ins = instruction::load(&bytes.to_vec(), model.hidden_size(), model.text_positions().map_err(pipeline_error)?).map_err(pipeline_error)?;
        let words = visii_pipeline::words::nearest_words_async(&model.text, &model.tokenizer, &ins.rows, ins.positions, 1..ins.eos, k.clamp(1, 20))
            .await
            .map_err(pipeline_error)?;
        Ok(to_js(&words))
    }

    /// What is loaded: `{ ip2p: {name, fingerprint} | null, clip: bool }`.
    #[wasm_bindgen(js_name = modelInfo)]
    pub fn model_info(&self) -> JsValue {
        let id = self.ip2p.borrow().as_ref().map(|(_, i)| i.clone());
        let info = serde_json::json!({
            "ip2p": id.map(|i| serde_json::json!({"name": i.name, "fingerprint": i.fingerprint()})),
            "clip": self.clip.borrow().is_some(),
        });
        to_js(&info)
    }
}

/// Validate an instruction file and describe it: `{ positions, hidden, eos, metadata, baseModel:
/// {name, fingerprint} | null, thumbnailPng: Uint8Array | null, reusableNoise }`.
#[wasm_bindgen(js_name = inspectInstruction)]
pub fn inspect_instruction(bytes: js_sys::Uint8Array) -> Result<JsValue, JsValue> {
    let ins = instruction::peek(&bytes.to_vec()).map_err(pipeline_error)?;
    let mut meta = ins.metadata.clone();
    meta.remove("thumbnail_png_base64");
    let info = serde_json::json!({
        "positions": ins.positions, "hidden": ins.hidden, "eos": ins.eos, "metadata": meta,
        "baseModel": ins.base_model.as_ref().map(|b| serde_json::json!({"name": b.name, "fingerprint": b.fingerprint()})),
        "reusableNoise": ins.noise_reuse.is_some(),
    });
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Inspected {
        #[serde(flatten)]
        info: serde_json::Value,
        thumbnail_png: Option<serde_bytes::ByteBuf>,
    }
    Ok(to_js(&Inspected { info, thumbnail_png: ins.thumbnail_png().map(serde_bytes::ByteBuf::from) }))
}

/// The page's results as one zip (`names[i]` holds `files[i]`; stored, not compressed: PNGs are
/// compressed already), made here rather than in JS so its names are checked
/// (`visii_formats::zip`): resolves to a `Blob` of type `application/zip`.
#[wasm_bindgen(js_name = makeZip)]
pub fn make_zip(names: Vec<String>, files: Vec<js_sys::Uint8Array>) -> Result<web_sys::Blob, JsValue> {
    if names.len() != files.len() {
        return Err(error("OptionsError", format!("{} names for {} files", names.len(), files.len())));
    }
    let entries: Vec<(String, Vec<u8>)> = names.into_iter().zip(files.iter().map(|f| f.to_vec())).collect();
    let zip = visii_formats::zip::stored(&entries).map_err(|e| error("OptionsError", e))?;
    drop(entries);
    Ok(gloo_file::Blob::new_with_options(&zip[..], Some("application/zip")).into())
}
