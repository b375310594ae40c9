//! Our own kernels for burn's cubecl backend (wgpu natively, WebGPU in a browser), written as plain
//! WGSL: no subgroups, no cooperative matrices, nothing a browser's WebGPU may lack.
//!
//! - [`conv2d`]: convolution as an implicit GEMM on NCHW tensors (no layout copies; `gemm.rs`).
//! - [`linear`]: `x · W + b` on the same GEMM.
//! - Both add a residual where given, in the GEMM's epilogue ([`Residual`]; `resident::Layer::run_add`).
//! - [`group_norm`]: GroupNorm (+ SiLU) and LayerNorm in two kernels with parallel reductions,
//!   [`softmax`] in one (`norm.rs`); their input gradient in two more ([`group_norm_grad_cube`]).
//! - [`geglu`]: the transformers' GEGLU activation in one kernel, its input gradient in one more
//!   (`geglu.rs`).
//!
//! Inside learning's autodiff, `crate::fused` wires the attention, norm and GEGLU kernels in as
//! autodiff steps with these backward kernels.
//!
//! Each entry point takes burn tensors and returns `Err` with its input untouched where the kernel
//! does not apply (another backend, a type other than f32 / f16, autodiff, grouped or dilated convs), so the
//! caller falls back to burn's own op. Set `VISII_KERNELS=burn` (or [`set_enabled`]) to run burn's
//! ops everywhere, for comparisons. The parity tests against burn's ops are in
//! `tests/kernels.rs`, the speed in `visii bench --what conv|linear`.

pub mod flash;
pub mod geglu;
pub mod gemm;
pub mod gemv;
pub mod norm;

use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use burn_backend::TensorMetadata;
use burn_cubecl::cubecl::ir::settings::Dim3;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn_cubecl::tensor::CubeTensor;
use burn_dispatch::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use std::sync::atomic::{AtomicU8, Ordering};

pub use gemm::{ALayout, BLayout, Bias, GemmConfig, Residual};
pub use gemv::{SkinnyA, SkinnyB, SkinnyConfig};

/// A switch read once from the environment variable `var` natively (on unless it says
/// `off_value`); in a browser it is `web`. `cell` holds 0 (not read yet), 1 (on) or 2 (off).
pub(crate) fn switch(cell: &AtomicU8, var: &str, off_value: &str, web: bool) -> bool {
    switch_with(cell, var, |v| v.is_none_or(|v| v != off_value), web)
}

/// A switch read once: natively `native` of the environment variable `var` (`None` when unset),
/// in a browser `web`; a `set_*` call before the first read wins (the value is stored only where
/// the cell still holds 0). `cell` holds 0 (not read yet), 1 (on) or 2 (off).
pub(crate) fn switch_with(cell: &AtomicU8, var: &str, native: impl FnOnce(Option<&str>) -> bool, web: bool) -> bool {
    match cell.load(Ordering::Relaxed) {
        0 => {
            #[cfg(not(target_family = "wasm"))]
            let on = {
                let _ = web;
                native(std::env::var(var).ok().as_deref())
            };
            #[cfg(target_family = "wasm")]
            let on = {
                let _ = (var, native);
                web
            };
            match cell.compare_exchange(0, if on { 1 } else { 2 }, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => on,
                Err(set) => set == 1,
            }
        }
        v => v == 1,
    }
}

/// 0: not yet read from the environment, 1: ours, 2: burn's.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether our kernels replace burn's ops (default yes; `VISII_KERNELS=burn` says no).
pub fn enabled() -> bool {
    switch(&ENABLED, "VISII_KERNELS", "burn", true)
}

/// Turns our kernels on or off for this process (benchmarks and parity tests compare both).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// 0: not yet read from the environment, 1: on, 2: off.
static EPILOGUE: AtomicU8 = AtomicU8::new(0);

/// Whether a layer adds a residual (`resident::Layer::run_add`) and, inside autodiff, its bias in
/// its GEMM's epilogue: on by default (`VISII_EPILOGUE=off`, the page's `?epilogue=off`: burn's
/// adds after the GEMM, for comparisons). Outside autodiff the bias is always in the epilogue.
pub fn epilogue_enabled() -> bool {
    switch(&EPILOGUE, "VISII_EPILOGUE", "off", true)
}

/// Turns the epilogue's residual (and learning's bias) on or off for this process.
pub fn set_epilogue(on: bool) {
    EPILOGUE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// A buffer's element type in our kernels: f32, or f16 on adapters with `shader-f16` (f16
/// activations). Every kernel reads its values into f32, computes in f32 and converts on the store,
/// so an f16 kernel differs from the f32 one only in the memory it reads and writes (and in the
/// output's rounding to f16); weights may stay f32 under f16 activations (no per-layer cast).
///
/// `Q8` is an int8 weight as the models keep it on the device (`resident.rs`): symmetric int8 packed
/// four to a `u32` along the last axis, one f32 scale per `block` values; an operand of that type is
/// bound as its packed values and, at the next binding, its scales (`{name}_s`), and each value is
/// dequantised as it is read (no f32 copy of the weight).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Elem {
    #[default]
    F32,
    F16,
    Q8 { block: u32 },
}

impl Elem {
    /// The element type of a tensor of `dtype`, where our kernels take it.
    pub fn of(dtype: DType) -> Option<Elem> {
        match dtype {
            DType::F32 => Some(Elem::F32),
            DType::F16 => Some(Elem::F16),
            _ => None,
        }
    }

    /// The type of a tensor written in this element type (never int8: kernels write floats).
    pub fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F16 => DType::F16,
            Elem::Q8 { .. } => unreachable!("our kernels write f32 or f16"),
        }
    }

    /// The WGSL type of the bound array's elements.
    pub fn wgsl(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Q8 { .. } => "u32",
        }
    }

    /// The value at index `idx` of the array `buf` as an f32 (for int8: the byte `idx % 4` of word
    /// `idx / 4`, sign-extended, times the scale of its block).
    pub fn read(self, buf: &str, idx: &str) -> String {
        match self {
            Elem::F32 => format!("{buf}[{idx}]"),
            Elem::F16 => format!("f32({buf}[{idx}])"),
            Elem::Q8 { block } => {
                format!("(f32(extractBits(bitcast<i32>({buf}[({idx}) >> 2u]), (({idx}) & 3u) * 8u, 8u)) * {buf}_s[({idx}) / {block}u])")
            }
        }
    }

    /// Declares the array `name` at binding `*next` (and an int8 operand's scales `{name}_s` at
    /// the one after), advancing `*next`.
    pub fn declare(self, w: &mut String, name: &str, next: &mut u32) {
        use std::fmt::Write as _;
        let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> {name}: array<{}>;", *next, self.wgsl());
        *next += 1;
        if let Elem::Q8 { .. } = self {
            let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> {name}_s: array<f32>;", *next);
            *next += 1;
        }
    }

    /// The WGSL expression `e` (an f32) as a value of this type.
    pub fn store(self, e: &str) -> String {
        match self {
            Elem::F32 => e.to_string(),
            Elem::F16 => format!("f16({e})"),
            Elem::Q8 { .. } => unreachable!("our kernels write f32 or f16"),
        }
    }

    /// The WGSL expression `e` (a `vec4<f32>`) as four values of this type (an array declared by
    /// [`Self::declare4`]).
    pub fn store4(self, e: &str) -> String {
        match self {
            Elem::F32 => e.to_string(),
            Elem::F16 => format!("vec4<f16>({e})"),
            Elem::Q8 { .. } => unreachable!("our kernels write f32 or f16"),
        }
    }

    /// Declares `name` as an array of 4-value groups at binding `*next` (see [`Self::read4`]; an
    /// int8 operand's packed words already are: four values to a `u32`), advancing `*next`.
    pub fn declare4(self, w: &mut String, name: &str, next: &mut u32) {
        use std::fmt::Write as _;
        match self {
            Elem::F32 | Elem::F16 => {
                let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> {name}: array<vec4<{}>>;", *next, self.wgsl());
                *next += 1;
            }
            Elem::Q8 { .. } => self.declare(w, name, next),
        }
    }

    /// Values `4 * idx .. 4 * idx + 4` of the array `buf` declared by [`Self::declare4`], as a
    /// `vec4<f32>` (int8: the four bytes of word `idx` times their scale; the block is a multiple of
    /// four, so the four share one).
    pub fn read4(self, buf: &str, idx: &str) -> String {
        match self {
            Elem::F32 => format!("{buf}[{idx}]"),
            Elem::F16 => format!("vec4<f32>({buf}[{idx}])"),
            Elem::Q8 { block } => format!(
                "(vec4<f32>((vec4<i32>(bitcast<i32>({buf}[{idx}])) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u)) * {buf}_s[({idx}) * 4u / {block}u])"
            ),
        }
    }

    /// Whether [`Self::read4`] can read this type (an int8 block of four or more).
    pub fn reads4(self) -> bool {
        match self {
            Elem::F32 | Elem::F16 => true,
            Elem::Q8 { block } => block % 4 == 0,
        }
    }

    /// Writes WGSL's `enable f16;` where any of `elems` is f16 (it must open the module).
    pub fn enable(w: &mut String, elems: &[Elem]) {
        if elems.contains(&Elem::F16) {
            w.push_str("enable f16;\n");
        }
    }
}

/// The value at row `y`, column `x` (i32 expressions) of the `p.h x p.w` image that starts at `base`
/// in `buf`, as an f32, zero outside the image (and where `also`, a bool expression ending in `&`,
/// fails), without a branch: the load from the nearest pixel inside, then `select`, the test with
/// `&` (`&&` short-circuits: a branch). A branch around each load costs more than the load on CPU
/// adapters (SIMD lanes), and with 8 or more per loop step SwiftShader's compiler never finished,
/// its memory growing by gigabytes a minute (BENCHMARKS.md).
pub(crate) fn image_value(e: Elem, buf: &str, base: &str, y: &str, x: &str, also: &str) -> String {
    format!(
        "select(0.0, {}, {also}({y} >= 0) & ({y} < i32(p.h)) & ({x} >= 0) & ({x} < i32(p.w)))",
        e.read(buf, &format!("{base} + u32(clamp({y}, 0, i32(p.h) - 1)) * p.w + u32(clamp({x}, 0, i32(p.w) - 1))"))
    )
}

/// The element types of a GEMM's operands: `a`, `b`, `bias` read, `c` written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Elems {
    pub a: Elem,
    pub b: Elem,
    pub bias: Elem,
    pub c: Elem,
}

impl Elems {
    pub const F32: Elems = Elems { a: Elem::F32, b: Elem::F32, bias: Elem::F32, c: Elem::F32 };
}

/// One of our generated kernels as cubecl sees it: an id covering its configuration (so every
/// configuration compiles once) and the WGSL text, made only when cubecl compiles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Wgsl {
    Gemm(GemmConfig),
    Skinny(SkinnyConfig),
    Flash(flash::FlashConfig),
    FlashGrad(flash::FlashGradConfig),
    Norm(norm::NormKernel),
    Geglu(geglu::GegluKernel),
}

impl Wgsl {
    fn threads(&self) -> u32 {
        match self {
            Wgsl::Gemm(c) => c.threads(),
            Wgsl::Skinny(c) => c.threads(),
            Wgsl::Flash(_) | Wgsl::FlashGrad(_) => flash::THREADS,
            Wgsl::Norm(_) => norm::THREADS,
            Wgsl::Geglu(_) => geglu::THREADS,
        }
    }
}

impl KernelMetadata for Wgsl {
    fn name(&self) -> &'static str {
        match self {
            Wgsl::Gemm(c) => match c.b {
                BLayout::Pointwise | BLayout::PointwiseT => "visii::gemm_pointwise",
                BLayout::Conv { .. } => "visii::gemm_conv2d",
            },
            Wgsl::Skinny(c) => match c.b {
                SkinnyB::Rows => "visii::gemv_rows",
                SkinnyB::Conv { .. } => "visii::gemv_conv2d",
            },
            Wgsl::Flash(_) => "visii::flash_attention",
            Wgsl::FlashGrad(c) => match c.part {
                flash::GradPart::Dq => "visii::flash_attention_dq",
                flash::GradPart::DkDv => "visii::flash_attention_dkdv",
            },
            Wgsl::Norm(norm::NormKernel::Stats { .. }) => "visii::norm_stats",
            Wgsl::Norm(norm::NormKernel::Apply { .. }) => "visii::norm_apply",
            Wgsl::Norm(norm::NormKernel::Softmax { .. }) => "visii::softmax",
            Wgsl::Norm(norm::NormKernel::GradSums { .. }) => "visii::norm_grad_sums",
            Wgsl::Norm(norm::NormKernel::GradApply { .. }) => "visii::norm_grad_apply",
            Wgsl::Geglu(k) if k.grad => "visii::geglu_grad",
            Wgsl::Geglu(_) => "visii::geglu",
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(*self).cube_dim(Dim3::new_1d(self.threads()))
    }

    fn address_type(&self) -> ElemType {
        ElemType::UInt(burn_cubecl::cubecl::ir::UIntKind::U32)
    }
}

impl CubeKernel for Wgsl {
    fn define(&self) -> KernelDefinition {
        let settings = KernelSettings::new(Dim3::new_1d(self.threads()), ExecutionMode::Checked, AddressType::U32);
        KernelDefinition { body: Scope::root(settings.clone()), settings, info: Default::default() }
    }

    fn source(&self) -> Option<PrecompiledSource> {
        let source = match self {
            Wgsl::Gemm(c) => c.wgsl(),
            Wgsl::Skinny(c) => c.wgsl(),
            Wgsl::Flash(c) => c.wgsl(),
            Wgsl::FlashGrad(c) => c.wgsl(),
            Wgsl::Norm(k) => k.wgsl(),
            Wgsl::Geglu(k) => k.wgsl(),
        };
        Some(PrecompiledSource { source, entrypoint_name: "main".into(), lang: "wgsl" })
    }
}

/// u32 parameters (an even number) as the uniform cubecl appends after the buffers.
fn params<const N: usize>(words: [usize; N]) -> MetadataBindingInfo {
    let words = words.map(|v| u32::try_from(v).expect("kernel sizes fit u32"));
    MetadataBindingInfo::custom(words.chunks(2).map(|w| w[0] as u64 | (w[1] as u64) << 32).collect())
}

/// A 2-D dispatch of `groups` workgroups (WebGPU allows 65535 per axis): `(x, y)`.
fn spread(groups: usize) -> (u32, u32) {
    let x = groups.min(MAX_GROUPS);
    (x as u32, groups.div_ceil(x.max(1)) as u32)
}

/// Which GEMM shapes suit the adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    /// A GPU: [`gemm::VARIANTS`], the least padded work.
    Gpu,
    /// SwiftShader (Chrome's CPU WebGPU): [`gemm::CPU_VARIANTS`], 4 x 4 per invocation.
    SwiftShader,
    /// Mesa's lavapipe (Vulkan on the CPU): [`gemm::VARIANTS`] by padded work over a measured rate
    /// per workgroup size (larger workgroups run faster there, see [`GemmConfig::pick_lavapipe`]).
    Lavapipe,
}

/// 0: not yet decided, else 1 + the [`Tiles`] index.
static TILES: AtomicU8 = AtomicU8::new(0);

/// The adapter's GEMM shapes: set by [`set_cpu_adapter`], else `VISII_GEMM=gpu|cpu|lavapipe`,
/// else from the adapter's name (SwiftShader; llvmpipe is lavapipe's).
fn tiles(client: &Client) -> Tiles {
    const ALL: [Tiles; 3] = [Tiles::Gpu, Tiles::SwiftShader, Tiles::Lavapipe];
    match TILES.load(Ordering::Relaxed) {
        0 => {
            #[cfg(not(target_family = "wasm"))]
            let forced = std::env::var("VISII_GEMM").ok().and_then(|v| match v.as_str() {
                "gpu" => Some(Tiles::Gpu),
                "cpu" | "swiftshader" => Some(Tiles::SwiftShader),
                "lavapipe" => Some(Tiles::Lavapipe),
                _ => None,
            });
            #[cfg(target_family = "wasm")]
            let forced = None;
            let t = forced.unwrap_or_else(|| {
                let name = client.properties().identity.name.to_lowercase();
                if name.contains("swiftshader") {
                    Tiles::SwiftShader
                } else if name.contains("llvmpipe") {
                    Tiles::Lavapipe
                } else {
                    Tiles::Gpu
                }
            });
            TILES.store(1 + ALL.iter().position(|&a| a == t).unwrap_or(0) as u8, Ordering::Relaxed);
            t
        }
        v => ALL[(v - 1) as usize % 3],
    }
}

/// Says whether the adapter is SwiftShader or another fallback adapter (the page knows from
/// `GPUAdapterInfo`, where wgpu's name of the adapter may be empty).
pub fn set_cpu_adapter(cpu: bool) {
    TILES.store(if cpu { 2 } else { 1 }, Ordering::Relaxed);
}

fn pick(client: &Client, m: usize, n: usize, a: ALayout, b: BLayout) -> GemmConfig {
    match tiles(client) {
        Tiles::Gpu => GemmConfig::pick_from(&gemm::VARIANTS, m, n, a, b),
        Tiles::SwiftShader => GemmConfig::pick_from(&gemm::CPU_VARIANTS, m, n, a, b),
        Tiles::Lavapipe => GemmConfig::pick_lavapipe(m, n, a, b),
    }
}

/// The most output pixels of a conv, rows of a Linear and rows of a Linear's input gradient that go
/// to the skinny kernel (more go to the tiled GEMM). Measured on lavapipe: 3x3 conv 1280 -> 1280 at
/// 8 columns 4.3 against 3.4 GFLOP/s, at 12 columns 2.1 against 2.5; Linear 640 -> 5120 over 8 rows
/// 2.7 against 2.3 (the best tile), over 16 rows 2.7 against 4.6. With lavapipe's small skinny
/// workgroups ([`skinny_threads`]) a Linear over 9 to 16 rows is faster skinny there too (640 ->
/// 5120 over 16 rows 11-13 against 25-37 ms tiled, 2560 -> 640 7-10 against 15-20 ms), while a conv
/// over 16 pixels stays faster tiled (640 -> 640 at 4 x 4: 29 against 31 ms skinny).
fn skinny_limits(client: &Client) -> (usize, usize, usize) {
    match tiles(client) {
        Tiles::Lavapipe => (8, 16, 8),
        _ => (8, 8, 8),
    }
}

/// The problem a launch solves, in the kernel's terms (see `gemm.rs`).
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    /// Output pixels per image and the output width.
    ohw: usize,
    ow: usize,
    /// Input height, width and values per image.
    h: usize,
    w: usize,
    img: usize,
}

/// What a GEMM adds to its sums: the layer's bias along `C`'s rows or columns (see [`Bias`]) and a
/// residual of `kind` (see [`Residual`]; contiguous, in the output's type), each where present.
/// Both are launch parameters, not part of the compiled variant.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<(&'a CubeTensor, Bias)>,
    residual: Option<(&'a CubeTensor, Residual)>,
}

impl Epilogue<'_> {
    const NONE: Epilogue<'static> = Epilogue { bias: None, residual: None };

    /// The residual's strides for `p` (`rm = 0`: none).
    fn strides(&self, p: &Problem) -> [usize; 3] {
        self.residual.map_or(Residual::None, |(_, kind)| kind).strides(p.m, p.ohw)
    }

    /// The kernels' `p.bias` ([`Bias::mode`]).
    fn bias_mode(&self) -> usize {
        self.bias.map_or(Bias::None, |(_, along)| along).mode()
    }
}

/// The placeholder buffers' uses: a GEMM without a bias binds one, without a residual the other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unused {
    Bias,
    Residual,
}

thread_local! {
    /// Per device, the buffers bound as the bias and the residual of the GEMMs without them (never
    /// read): four f32 values each, made once and kept. A new one per launch held more memory in
    /// exact-size mode (each its own buffer: `browser_allocator` test), and no buffer of the launch
    /// can stand in for one, nor one for both: every binding is read_write, and WebGPU forbids two
    /// writable bindings of one range.
    static PLACEHOLDERS: std::cell::RefCell<Vec<(Unused, CubeTensor)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn placeholder(like: &CubeTensor, usage: Unused) -> CubeTensor {
    PLACEHOLDERS.with(|cell| {
        let mut kept = cell.borrow_mut();
        if let Some((_, t)) = kept.iter().find(|(u, t)| *u == usage && t.device == like.device) {
            return t.clone();
        }
        let t = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), vec![4].into(), DType::F32);
        kept.push((usage, t.clone()));
        t
    })
}

/// A new contiguous `out_shape` tensor of `out` elements and the bindings `a` (with an int8
/// operand's scales), `b` (likewise), the bias, the residual, `out` of both GEMM kernels (the caller
/// adds the parameters). Without a bias or a residual its binding is a [`placeholder`] (never read:
/// every variant declares both, so that layers with and without them run the same pipeline).
fn gemm_operands(a: &[CubeTensor], b: &[CubeTensor], add: Epilogue, out_shape: Vec<usize>, out: Elem) -> (CubeTensor, KernelArguments) {
    let (client, device) = (a[0].client.clone(), a[0].device.clone());
    let unused = |present: bool, usage: Unused| if present { None } else { Some(placeholder(&a[0], usage)) };
    let (no_bias, no_residual) = (unused(add.bias.is_some(), Unused::Bias), unused(add.residual.is_some(), Unused::Residual));
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client, device, out_shape.into(), out.dtype());
    let mut args = KernelArguments::new();
    let bias = add.bias.map(|(t, _)| t).or(no_bias.as_ref());
    let residual = add.residual.map(|(r, _)| r).or(no_residual.as_ref());
    for t in a.iter().chain(b).chain(bias).chain(residual) {
        args = args.with_buffer_io(t.handle.clone().binding(), BufferIOAttr::ReadOnly);
    }
    let args = args.with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly);
    (out, args)
}

/// Launches `cfg` with `a`, `b`, the epilogue's tensors (contiguous, of `cfg.elems`' types) into a
/// new contiguous `out_shape` tensor.
fn launch(cfg: GemmConfig, a: &[CubeTensor], b: &[CubeTensor], add: Epilogue, p: Problem, out_shape: Vec<usize>) -> CubeTensor {
    let cfg = cfg.for_problem(p.k, p.ohw, tiles(&a[0].client) == Tiles::Lavapipe);
    let (out, args) = gemm_operands(a, b, add, out_shape, cfg.elems.c);
    let [rimg, rm, rpix] = add.strides(&p);
    let args = args.with_info(params([p.m, p.n, p.k, p.ohw, p.ow, p.h, p.w, p.img, rimg, rm, rpix, add.bias_mode()]));
    let count = CubeCount::Static(p.n.div_ceil(cfg.bn() as usize) as u32, p.m.div_ceil(cfg.bm() as usize) as u32, 1);
    a[0].client.launch(Box::new(Wgsl::Gemm(cfg)), count, args);
    out
}

/// 0: not yet read from the environment, 1: on, 2: off.
static SKINNY: AtomicU8 = AtomicU8::new(0);

/// Whether GEMMs with a few columns (or rows, for a Linear; see [`skinny_limits`]) run on the skinny
/// kernel (natively by default; `VISII_GEMV=off` keeps them on the tiled one, for comparisons). Off
/// in a browser for now: not yet run through Dawn on a GPU, and on SwiftShader it wins the sample
/// step but loses the learning step (BENCHMARKS.md; its learning step there no longer crashes since
/// its loads are branch-free).
pub fn skinny_enabled() -> bool {
    switch(&SKINNY, "VISII_GEMV", "off", false)
}

/// Turns the skinny kernel on or off for this process (the page's `?gemv=on|off`, for diagnosis).
pub fn set_skinny(on: bool) {
    SKINNY.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// 0: not yet read from the environment, 1: on, 2: off.
static SKINNY_GRAD: AtomicU8 = AtomicU8::new(0);

/// Whether the input gradient of a Linear over a few rows and of a stride-1 conv over a few pixels
/// runs on the skinny kernel where the skinny kernel is on at all (`VISII_GEMV_GRAD=off`, the
/// page's `?gemvGrad=off`: the tiled one; for diagnosis).
pub fn skinny_grad_enabled() -> bool {
    skinny_enabled() && switch(&SKINNY_GRAD, "VISII_GEMV_GRAD", "off", true)
}

/// Turns the skinny input gradient on or off for this process (see [`skinny_grad_enabled`]).
pub fn set_skinny_grad(on: bool) {
    SKINNY_GRAD.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// 0: not yet read from the environment, 1: on, 2: off.
static Q8_IN_PLACE: AtomicU8 = AtomicU8::new(0);

/// Whether our GEMMs read int8-resident weights in place, dequantising each value as a tile loads
/// it ([`Elem::Q8`]), instead of a float copy of the whole weight made per layer first: by default,
/// natively and in a browser (`VISII_Q8=off`, the page's `?q8=off`: the copy, for comparisons). In
/// a tab (SwiftShader, the tiny model) the same images as the CLI's and faster than the copy.
pub fn q8_enabled() -> bool {
    switch(&Q8_IN_PLACE, "VISII_Q8", "off", true)
}

/// Turns reading int8 weights in place on or off for this process (see [`q8_enabled`]; the
/// page's `?q8=on|off`).
pub fn set_q8(on: bool) {
    Q8_IN_PLACE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Launches the skinny kernel `cfg` (see `gemv.rs`) with `a`, `b`, the epilogue's tensors
/// (contiguous, of `cfg.elems`' types) into a new contiguous `out_shape` tensor.
fn launch_skinny(cfg: SkinnyConfig, a: &[CubeTensor], b: &[CubeTensor], add: Epilogue, p: Problem, out_shape: Vec<usize>) -> CubeTensor {
    let (out, args) = gemm_operands(a, b, add, out_shape, cfg.elems.c);
    let (gx, gy) = spread(p.m.div_ceil(cfg.rows_per_group() as usize));
    let [rimg, rm, rpix] = add.strides(&p);
    let args = args.with_info(params([p.m, p.n, p.k, cfg.steps(p.k), p.ohw, p.ow, p.h, p.w, p.img, gx as usize, rimg, rm, rpix, add.bias_mode()]));
    a[0].client.launch(Box::new(Wgsl::Skinny(cfg)), CubeCount::Static(gx, gy, 1), args);
    out
}

/// Invocations per workgroup of the skinny kernel: 64 on a GPU; on lavapipe 8 where they split `K`
/// and 4 where each owns rows (`A` transposed). lavapipe runs a workgroup's invocations as SIMD
/// lanes and reads a storage buffer at lane-varying addresses one lane at a time; measured there
/// (BENCHMARKS.md, "Small skinny workgroups on the CPU adapters"), small workgroups stream the
/// weights 2-3x faster: Linear 4 x 1280 -> 10240 35 -> 14 ms, 3x3 conv 1280 -> 1280 over 2 x 2
/// pixels 38 -> 16-24 ms. SwiftShader: 8 where they split `K` (that conv 73-82 -> 45 ms; a Linear's
/// speed there does not depend on the count). `VISII_GEMV_THREADS` (natively) forces a count, for
/// measurements.
fn skinny_threads(client: &Client, a: SkinnyA) -> u32 {
    #[cfg(not(target_family = "wasm"))]
    if let Some(t) = std::env::var("VISII_GEMV_THREADS").ok().and_then(|v| v.parse::<u32>().ok()).filter(|t| t.is_power_of_two() && *t <= 256) {
        return t;
    }
    match (tiles(client), a) {
        (Tiles::Lavapipe, SkinnyA::Transposed) => 4,
        (Tiles::Lavapipe | Tiles::SwiftShader, SkinnyA::RowMajor | SkinnyA::ConvFlipped { .. }) => 8,
        _ => gemv::THREADS,
    }
}

impl SkinnyConfig {
    /// This variant with the invocations per workgroup that suit the adapter for its form
    /// ([`skinny_threads`]).
    fn adapted(self, client: &Client) -> Self {
        self.with_threads(skinny_threads(client, self.a))
    }
}

/// Whether a skinny dispatch for `m` rows fits WebGPU's workgroup counts (a 2-D spread).
fn skinny_dispatchable(cfg: &SkinnyConfig, m: usize) -> bool {
    m.div_ceil(cfg.rows_per_group() as usize) <= MAX_GROUPS * MAX_GROUPS
}

pub(crate) fn contiguous(t: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(t)
}

/// The element types of a GEMM reading `a`, `b` (and `bias`) and writing `out`, where every float
/// one is f32 or f16 (f16 activations: the weights may stay f32, or int8).
fn elems(a: Option<Elem>, b: Option<Elem>, bias: Option<&CubeTensor>, out: &CubeTensor) -> Option<Elems> {
    Some(Elems {
        a: a?,
        b: b?,
        bias: match bias {
            Some(t) => Elem::of(t.dtype)?,
            None => Elem::F32,
        },
        c: Elem::of(out.dtype)?,
    })
}

/// A frozen weight as our GEMMs read it: a float tensor (f32 or f16), or int8 as the models keep it
/// on the device (see [`Elem::Q8`] and [`Q8::of`]).
pub enum Weight {
    Float(CubeTensor),
    Q8(Q8),
}

/// An int8-resident weight (`resident.rs`) read in place: its packed values (`u32`), its f32
/// scales, one per `block` values along the last axis.
#[derive(Clone)]
pub struct Q8 {
    values: CubeTensor,
    scales: CubeTensor,
    block: u32,
}

impl Q8 {
    /// The parts of the quantised tensor `q` where our kernels can read it in place: symmetric
    /// int8 packed four to a `u32` along the last axis, one f32 scale per block of a multiple of 4
    /// values along it and no other level, values and scales contiguous (not storage-tiled);
    /// `None` for any other scheme.
    pub fn of(q: &CubeTensor) -> Option<Q8> {
        use burn::tensor::quantization::{QuantStore, QuantValue, ScaleDtype};
        let DType::QFloat(scheme) = q.dtype else { return None };
        let level = scheme.block_scale()?;
        let dims = level.size.as_slice();
        let (&block, outer) = dims.split_last()?;
        let ok = scheme.value == QuantValue::Q8S
            && scheme.store == QuantStore::PackedU32(0)
            && scheme.tensor_scale().is_none()
            && level.dtype == ScaleDtype::F32
            && outer.iter().all(|&d| d == 1)
            && block > 0
            && block % 4 == 0
            && !q.meta.is_tiled()
            && q.shape().to_vec().last().is_some_and(|&n| n % block as usize == 0);
        if !ok {
            return None;
        }
        let (values, scales) = q.quantized_handles()?;
        (values.dtype == DType::U32 && values.is_contiguous() && scales.dtype == DType::F32 && scales.is_contiguous())
            .then_some(Q8 { values, scales, block: block as u32 })
    }
}

impl Weight {
    fn elem(&self) -> Option<Elem> {
        match self {
            Weight::Float(t) => Elem::of(t.dtype),
            Weight::Q8(q) => Some(Elem::Q8 { block: q.block }),
        }
    }

    fn client(&self) -> &Client {
        match self {
            Weight::Float(t) => &t.client,
            Weight::Q8(q) => &q.values.client,
        }
    }

    /// The buffers the kernel binds for it (a float weight made contiguous).
    fn bindings(self) -> Vec<CubeTensor> {
        match self {
            Weight::Float(t) => vec![contiguous(t)],
            Weight::Q8(q) => vec![q.values, q.scales],
        }
    }

    fn float(self) -> CubeTensor {
        match self {
            Weight::Float(t) => t,
            Weight::Q8(_) => unreachable!("only a float weight is handed back to burn"),
        }
    }
}

/// Largest dispatch along one axis (WebGPU's default `maxComputeWorkgroupsPerDimension`).
const MAX_GROUPS: usize = 65535;

/// Whether every tensor of these shapes has fewer than 2^32 - 1 values (the kernels index in u32;
/// counted in u64 so that a 32-bit target cannot wrap).
fn fits_u32(shapes: &[&[usize]]) -> bool {
    shapes.iter().all(|s| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).is_some_and(|n| n < u32::MAX as u64))
}

/// Whether a `cfg` dispatch for an `m x n` output stays within WebGPU's workgroup counts.
fn dispatchable(cfg: &GemmConfig, m: usize, n: usize) -> bool {
    n.div_ceil(cfg.bn() as usize) <= MAX_GROUPS && m.div_ceil(cfg.bm() as usize) <= MAX_GROUPS
}

/// The kernel's conv on cubecl primitives: `x` `[n, c_in, h, w]`, `w` `[c_out, c_in, kh, kw]`,
/// `bias` `[c_out]`, with `options` (groups 1, dilation 1). `None` where it does not apply.
pub fn conv2d_cube(
    x: CubeTensor,
    w: CubeTensor,
    bias: Option<CubeTensor>,
    options: &ConvOptions<2>,
) -> Result<CubeTensor, (CubeTensor, CubeTensor, Option<CubeTensor>)> {
    conv2d_cube_on(x, w, bias, options, skinny_enabled())
}

/// [`conv2d_cube`] with the skinny kernel allowed or not (for a few output pixels).
pub fn conv2d_cube_on(
    x: CubeTensor,
    w: CubeTensor,
    bias: Option<CubeTensor>,
    options: &ConvOptions<2>,
    skinny: bool,
) -> Result<CubeTensor, (CubeTensor, CubeTensor, Option<CubeTensor>)> {
    let wdims = w.shape().dims::<4>();
    conv2d_weight(x, Weight::Float(w), wdims, bias, None, options, skinny).map_err(|(x, w, b, _)| (x, w.float(), b))
}

/// What a GEMM that does not apply hands back: the input, the weight, the bias, the residual.
pub type Refused = (CubeTensor, Weight, Option<CubeTensor>, Option<CubeTensor>);

/// How a GEMM writing an output of shape `out` in `types.c` adds `r`: [`Residual::Full`] where `r`
/// has that shape, [`Residual::PerImage`] where `r` is `[n, M, 1, 1]` for a conv's `out` `[n, M,
/// oh, ow]`; in the output's type. `None` for anything else.
fn residual_kind(r: &CubeTensor, out: &[usize], conv: bool, types: Elems) -> Option<Residual> {
    if Elem::of(r.dtype) != Some(types.c) {
        return None;
    }
    let dims = r.shape().to_vec();
    if dims == out {
        Some(Residual::Full)
    } else if conv && dims == [out[0], out[1], 1, 1] {
        Some(Residual::PerImage)
    } else {
        None
    }
}

/// The conv of `x` with a weight of real shape `wdims` `[c_out, c_in, kh, kw]`, float or int8
/// (read in place: an int8 one as `[c_out, .., c_in * kh * kw]`, the same values in the same order),
/// plus `bias` `[c_out]` and `residual` (`[n, c_out, oh, ow]`, or `[n, c_out, 1, 1]` per image; in
/// `x`'s type), each where given, in the GEMM's epilogue.
pub fn conv2d_weight(
    x: CubeTensor,
    w: Weight,
    wdims: [usize; 4],
    bias: Option<CubeTensor>,
    residual: Option<CubeTensor>,
    options: &ConvOptions<2>,
    skinny: bool,
) -> Result<CubeTensor, Refused> {
    // The weight is A, the image B; the output in the image's type.
    let Some(types) = elems(w.elem(), Elem::of(x.dtype), bias.as_ref(), &x) else { return Err((x, w, bias, residual)) };
    let [nb, c_in, h, wd] = x.shape().dims::<4>();
    let [c_out, c_in_w, kh, kw] = wdims;
    let [(pt, pb), (pl, pr)] = options.padding;
    let ok = options.groups == 1 && options.dilation == [1, 1] && c_in == c_in_w && h + pt + pb >= kh && wd + pl + pr >= kw;
    if !ok || nb == 0 || c_out == 0 {
        return Err((x, w, bias, residual));
    }
    let [sh, sw] = options.stride;
    let (oh, ow) = ((h + pt + pb - kh) / sh + 1, (wd + pl + pr - kw) / sw + 1);
    let added = match &residual {
        None => Residual::None,
        Some(r) => match residual_kind(r, &[nb, c_out, oh, ow], true, types) {
            Some(kind) => kind,
            None => return Err((x, w, bias, residual)),
        },
    };
    let (m, n, k) = (c_out, nb * oh * ow, c_in * kh * kw);
    let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt + pb + pl + pr == 0;
    let layout = if pointwise {
        BLayout::Pointwise
    } else {
        BLayout::Conv { kh: kh as u32, kw: kw as u32, sh: sh as u32, sw: sw as u32, ph: pt as u32, pw: pl as u32 }
    };
    if !fits_u32(&[&[nb, c_in, h, wd], &[c_out, c_in, kh, kw], &[nb, c_out, oh, ow]]) {
        return Err((x, w, bias, residual));
    }
    let p = Problem { m, n, k, ohw: oh * ow, ow, h, w: wd, img: c_in * h * wd };
    if n <= skinny_limits(w.client()).0 && skinny {
        // A few pixels: the skinny kernel, visiting only the taps that reach the image.
        let (ky0, nky) = gemv::taps(kh, sh, pt, h, oh);
        let (kx0, nkx) = gemv::taps(kw, sw, pl, wd, ow);
        let (kh, kw, sh, sw, ph, pw) = (kh as u32, kw as u32, sh as u32, sw as u32, pt as u32, pl as u32);
        let cfg = SkinnyConfig::new(n, SkinnyA::RowMajor, SkinnyB::Conv { kh, kw, sh, sw, ph, pw, ky0, nky, kx0, nkx })
            .with(types)
            .vectorised(m, k)
            .adapted(w.client());
        if skinny_dispatchable(&cfg, m) {
            let (x, bias, residual) = (contiguous(x), bias.map(contiguous), residual.map(contiguous));
            let add = Epilogue { bias: bias.as_ref().map(|b| (b, Bias::Row)), residual: residual.as_ref().map(|r| (r, added)) };
            return Ok(launch_skinny(cfg, &w.bindings(), &[x], add, p, vec![nb, c_out, oh, ow]));
        }
    }
    let cfg = pick(w.client(), m, n, ALayout::RowMajor, layout).with(types);
    if !dispatchable(&cfg, m, n) {
        return Err((x, w, bias, residual));
    }
    let (x, bias, residual) = (contiguous(x), bias.map(contiguous), residual.map(contiguous));
    let add = Epilogue { bias: bias.as_ref().map(|b| (b, Bias::Row)), residual: residual.as_ref().map(|r| (r, added)) };
    Ok(launch(cfg, &w.bindings(), &[x], add, p, vec![nb, c_out, oh, ow]))
}

/// `x · w + bias` on cubecl primitives: `x` `[.., K]`, `w` `[K, N]`, `bias` `[N]`.
pub fn linear_cube(x: CubeTensor, w: CubeTensor, bias: Option<CubeTensor>) -> Result<CubeTensor, (CubeTensor, CubeTensor, Option<CubeTensor>)> {
    linear_cube_on(x, w, bias, skinny_enabled())
}

/// [`linear_cube`] with the skinny kernel allowed or not (for a few rows).
pub fn linear_cube_on(
    x: CubeTensor,
    w: CubeTensor,
    bias: Option<CubeTensor>,
    skinny: bool,
) -> Result<CubeTensor, (CubeTensor, CubeTensor, Option<CubeTensor>)> {
    let wdims = w.shape().to_vec();
    if wdims.len() != 2 {
        return Err((x, w, bias));
    }
    linear_weight(x, Weight::Float(w), [wdims[0], wdims[1]], bias, None, skinny).map_err(|(x, w, b, _)| (x, w.float(), b))
}

/// `x · w + bias + residual` for a weight of real shape `wdims` `[K, N]`, float or int8 (read in
/// place); `bias` `[N]` and `residual` (of the output's shape and `x`'s type) where given.
pub fn linear_weight(
    x: CubeTensor,
    w: Weight,
    wdims: [usize; 2],
    bias: Option<CubeTensor>,
    residual: Option<CubeTensor>,
    skinny: bool,
) -> Result<CubeTensor, Refused> {
    // The tiled GEMM reads the input as A and the weight as B; the skinny one the other way round.
    let Some(types) = elems(Elem::of(x.dtype), w.elem(), bias.as_ref(), &x) else { return Err((x, w, bias, residual)) };
    let dims = x.shape().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if wdims[0] != k || k == 0 {
        return Err((x, w, bias, residual));
    }
    let n = wdims[1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    if m == 0 || n == 0 || !fits_u32(&[&[m, k], &[k, n], &[m, n]]) {
        return Err((x, w, bias, residual));
    }
    let mut out = dims;
    *out.last_mut().unwrap() = n;
    let added = match &residual {
        None => Residual::None,
        Some(r) => match residual_kind(r, &out, false, types) {
            Some(kind) => kind,
            None => return Err((x, w, bias, residual)),
        },
    };
    if m <= skinny_limits(w.client()).1 && skinny {
        // A few rows: `outᵀ = wᵀ xᵀ` on the skinny kernel (output features as its rows).
        let cfg = SkinnyConfig::new(m, SkinnyA::Transposed, SkinnyB::Rows)
            .with(Elems { a: types.b, b: types.a, ..types })
            .vectorised(n, k)
            .adapted(w.client());
        if skinny_dispatchable(&cfg, n) {
            let (x, bias, residual) = (contiguous(x), bias.map(contiguous), residual.map(contiguous));
            let p = Problem { m: n, n: m, k, ohw: 1, ow: 1, h: 1, w: 1, img: 0 };
            let add = Epilogue { bias: bias.as_ref().map(|b| (b, Bias::Row)), residual: residual.as_ref().map(|r| (r, added)) };
            return Ok(launch_skinny(cfg, &w.bindings(), &[x], add, p, out));
        }
    }
    let cfg = pick(w.client(), m, n, ALayout::RowMajor, BLayout::Pointwise).with(types);
    if !dispatchable(&cfg, m, n) {
        return Err((x, w, bias, residual));
    }
    let (x, bias, residual) = (contiguous(x), bias.map(contiguous), residual.map(contiguous));
    // B = w as a one-image pointwise input: c_in = K rows of N "pixels".
    let p = Problem { m, n, k, ohw: n, ow: n, h: 1, w: n, img: k * n };
    let add = Epilogue { bias: bias.as_ref().map(|b| (b, Bias::Col)), residual: residual.as_ref().map(|r| (r, added)) };
    Ok(launch(cfg, &[x], &w.bindings(), add, p, out))
}

/// The input gradient of a conv (weights frozen): `grad` `[n, c_out, oh, ow]`, `w` `[c_out, c_in,
/// kh, kw]`, for an input of `size_in` `[h, w]`. Stride 1 only (the transposed conv is then a conv
/// with the flipped, transposed weight, read in place); `Err` otherwise.
pub fn conv2d_input_grad_cube(
    grad: CubeTensor,
    w: CubeTensor,
    options: &ConvOptions<2>,
    size_in: [usize; 2],
) -> Result<CubeTensor, (CubeTensor, CubeTensor)> {
    let wdims = w.shape().dims::<4>();
    conv2d_input_grad_weight(grad, Weight::Float(w), wdims, options, size_in).map_err(|(g, w)| (g, w.float()))
}

/// [`conv2d_input_grad_cube`] for a weight of real shape `wdims`, float or int8 (read in place).
pub fn conv2d_input_grad_weight(
    grad: CubeTensor,
    w: Weight,
    wdims: [usize; 4],
    options: &ConvOptions<2>,
    size_in: [usize; 2],
) -> Result<CubeTensor, (CubeTensor, Weight)> {
    let [nb, c_out, oh, ow] = grad.shape().dims::<4>();
    let [c_out_w, c_in, kh, kw] = wdims;
    let [(pt, _), (pl, _)] = options.padding;
    let types = elems(w.elem(), Elem::of(grad.dtype), None, &grad);
    let ok = types.is_some() && options.groups == 1 && options.dilation == [1, 1] && options.stride == [1, 1];
    if !ok
        || c_out != c_out_w
        || pt + 1 > kh
        || pl + 1 > kw
        || oh + kh - 1 != size_in[0] + 2 * pt
        || ow + kw - 1 != size_in[1] + 2 * pl
        || nb * c_in == 0
    {
        return Err((grad, w));
    }
    let [h, wd] = size_in;
    let (m, n, k) = (c_in, nb * h * wd, c_out * kh * kw);
    let (ph, pw) = (kh - 1 - pt, kw - 1 - pl);
    let layout = if kh == 1 && kw == 1 && ph + pw == 0 {
        BLayout::Pointwise
    } else {
        BLayout::Conv { kh: kh as u32, kw: kw as u32, sh: 1, sw: 1, ph: ph as u32, pw: pw as u32 }
    };
    let types = types.unwrap_or_default();
    if !fits_u32(&[&[nb, c_out, oh, ow], &[c_out, c_in, kh, kw], &[nb, c_in, h, wd]]) {
        return Err((grad, w));
    }
    let p = Problem { m, n, k, ohw: h * wd, ow: wd, h: oh, w: ow, img: c_out * oh * ow };
    if n <= skinny_limits(w.client()).0 && skinny_grad_enabled() {
        // A few pixels (the deepest levels): the skinny kernel, visiting only the taps that reach
        // the gradient (over one pixel the centre), where the tiled one computes a padded tile.
        let (ky0, nky) = gemv::taps(kh, 1, ph, oh, h);
        let (kx0, nkx) = gemv::taps(kw, 1, pw, ow, wd);
        let (kh, kw, ph, pw) = (kh as u32, kw as u32, ph as u32, pw as u32);
        let b = SkinnyB::Conv { kh, kw, sh: 1, sw: 1, ph, pw, ky0, nky, kx0, nkx };
        let cfg = SkinnyConfig::new(n, SkinnyA::ConvFlipped { kk: kh * kw }, b)
            .with(types)
            .vectorised(m, k)
            .adapted(w.client());
        if skinny_dispatchable(&cfg, m) {
            return Ok(launch_skinny(cfg, &w.bindings(), &[contiguous(grad)], Epilogue::NONE, p, vec![nb, c_in, h, wd]));
        }
    }
    let cfg = pick(w.client(), m, n, ALayout::ConvFlipped { kk: (kh * kw) as u32 }, layout).with(types);
    if !dispatchable(&cfg, m, n) {
        return Err((grad, w));
    }
    let grad = contiguous(grad);
    Ok(launch(cfg, &w.bindings(), &[grad], Epilogue::NONE, p, vec![nb, c_in, h, wd]))
}

/// The input gradient of `x · w` (weights frozen): `grad` `[.., N]`, `w` `[K, N]`, giving `[.., K]`.
pub fn linear_input_grad_cube(grad: CubeTensor, w: CubeTensor) -> Result<CubeTensor, (CubeTensor, CubeTensor)> {
    let wdims = w.shape().to_vec();
    if wdims.len() != 2 {
        return Err((grad, w));
    }
    linear_input_grad_weight(grad, Weight::Float(w), [wdims[0], wdims[1]]).map_err(|(g, w)| (g, w.float()))
}

/// [`linear_input_grad_cube`] for a weight of real shape `wdims` `[K, N]`, float or int8 (read in
/// place).
pub fn linear_input_grad_weight(grad: CubeTensor, w: Weight, wdims: [usize; 2]) -> Result<CubeTensor, (CubeTensor, Weight)> {
    let dims = grad.shape().to_vec();
    let n = *dims.last().unwrap_or(&0);
    // The tiled GEMM reads the gradient as A and the weight as B; the skinny one the other way round.
    let Some(types) = elems(Elem::of(grad.dtype), w.elem(), None, &grad) else { return Err((grad, w)) };
    if wdims[1] != n || n == 0 {
        return Err((grad, w));
    }
    let k_in = wdims[0];
    let m: usize = dims[..dims.len() - 1].iter().product();
    if m == 0 || k_in == 0 || !fits_u32(&[&[m, n], &[k_in, n], &[m, k_in]]) {
        return Err((grad, w));
    }
    let mut out = dims;
    *out.last_mut().unwrap() = k_in;
    if m <= skinny_limits(w.client()).2 && skinny_grad_enabled() {
        // A few rows: `outᵀ = w gradᵀ`, `w` `[K_in, N]` row-major as stored.
        let cfg = SkinnyConfig::new(m, SkinnyA::RowMajor, SkinnyB::Rows).with(Elems { a: types.b, b: types.a, ..types });
        let cfg = cfg.vectorised(k_in, n).adapted(w.client());
        if skinny_dispatchable(&cfg, k_in) {
            let grad = contiguous(grad);
            let p = Problem { m: k_in, n: m, k: n, ohw: 1, ow: 1, h: 1, w: 1, img: 0 };
            return Ok(launch_skinny(cfg, &w.bindings(), &[grad], Epilogue::NONE, p, out));
        }
    }
    let cfg = pick(w.client(), m, k_in, ALayout::RowMajor, BLayout::PointwiseT).with(types);
    if !dispatchable(&cfg, m, k_in) {
        return Err((grad, w));
    }
    let grad = contiguous(grad);
    let p = Problem { m, n: k_in, k: n, ohw: k_in, ow: k_in, h: 1, w: k_in, img: 0 };
    Ok(launch(cfg, &[grad], &w.bindings(), Epilogue::NONE, p, out))
}

/// How a norm reads its input `[b, c, ..]` (GroupNorm over `groups` groups) or `[.., c]`
/// (LayerNorm, `groups = 1`): `rows` rows of `len` values, `s` values per channel, `c` channels (the
/// kernels' first four parameters, see `norm.rs`); `None` where the kernels do not take it.
fn norm_layout(dims: &[usize], groups: usize, layer_norm: bool) -> Option<(usize, usize, usize, usize)> {
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 || (layer_norm && groups != 1) || !fits_u32(&[dims]) {
        return None;
    }
    let layout = if layer_norm {
        let c = dims[dims.len() - 1];
        (dims[..dims.len() - 1].iter().product::<usize>(), c, 1, c)
    } else {
        let (b, c) = (dims[0], dims[1]);
        let s: usize = dims[2..].iter().product();
        (b * groups, c / groups * s, s, c)
    };
    (layout.0 * layout.1 > 0).then_some(layout)
}

/// The element types of a norm's input and of its `gamma` and `beta` (which must agree and hold one
/// value per channel); `None` where the kernels do not take them.
fn norm_elems(x: &CubeTensor, gamma: &CubeTensor, beta: &CubeTensor, c: usize) -> Option<(Elem, Elem)> {
    let (ex, affine, eb) = (Elem::of(x.dtype)?, Elem::of(gamma.dtype)?, Elem::of(beta.dtype)?);
    let ok = affine == eb && gamma.shape().num_elements() == c && beta.shape().num_elements() == c;
    ok.then_some((ex, affine))
}

/// GroupNorm of `x` `[b, c, ..]` over `groups` groups with per-channel `gamma`, `beta`, then SiLU
/// where asked; LayerNorm of `[.., c]` is `groups = 1` over a `[rows, c]` view (see `norm.rs`).
/// `Err` where the kernels do not apply.
pub fn group_norm_cube(
    x: CubeTensor,
    gamma: &CubeTensor,
    beta: &CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
    layer_norm: bool,
) -> Result<CubeTensor, CubeTensor> {
    group_norm_cube_stats(x, gamma, beta, groups, eps, silu, layer_norm).map(|(y, _, _)| y)
}

/// [`group_norm_cube`] that also returns its (contiguous) input and each row's `(mean, 1 / std)`
/// (f32 `[rows, 2]`): what [`group_norm_grad_cube`] needs.
#[allow(clippy::type_complexity)]
pub fn group_norm_cube_stats(
    x: CubeTensor,
    gamma: &CubeTensor,
    beta: &CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
    layer_norm: bool,
) -> Result<(CubeTensor, CubeTensor, CubeTensor), CubeTensor> {
    let dims = x.shape().to_vec();
    let Some((rows, len, s, c)) = norm_layout(&dims, groups, layer_norm) else { return Err(x) };
    let Some((ex, affine)) = norm_elems(&x, gamma, beta, c) else { return Err(x) };
    let total = rows * len;
    let x = contiguous(x);
    let (gamma, beta) = (contiguous(gamma.clone()), contiguous(beta.clone()));
    let (client, device) = (x.client.clone(), x.device.clone());
    let stats = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), vec![rows, 2].into(), DType::F32);
    let lanes = norm::lanes(len);
    let (gx, gy) = spread(rows.div_ceil((norm::THREADS / lanes) as usize));
    let eps_bits = (eps as f32).to_bits() as usize;
    let args = KernelArguments::new()
        .with_buffer_io(x.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(stats.handle.clone().binding(), BufferIOAttr::WriteOnly)
        .with_info(params([rows, len, s, c, eps_bits, gx as usize, 0, 0]));
    client.launch(Box::new(Wgsl::Norm(norm::NormKernel::Stats { lanes, x: ex })), CubeCount::Static(gx, gy, 1), args);
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device, dims.into(), ex.dtype());
    let (ax, ay) = spread(total.div_ceil(norm::THREADS as usize));
    let args = KernelArguments::new()
        .with_buffer_io(x.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(stats.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(gamma.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(beta.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly)
        .with_info(params([rows, len, s, c, eps_bits, ax as usize, 0, 0]));
    client.launch(Box::new(Wgsl::Norm(norm::NormKernel::Apply { silu, x: ex, affine })), CubeCount::Static(ax, ay, 1), args);
    Ok((out, x, stats))
}

/// The input gradient of [`group_norm_cube`] (with `gamma` and `beta` frozen) for the output's
/// gradient `dy`, from the forward's input `x` and `stats` ([`group_norm_cube_stats`]); `dy` in
/// `x`'s type. `Err(dy)` where the kernels do not apply (the forward checked the same).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_grad_cube(
    x: &CubeTensor,
    stats: &CubeTensor,
    gamma: &CubeTensor,
    beta: &CubeTensor,
    dy: CubeTensor,
    groups: usize,
    silu: bool,
    layer_norm: bool,
) -> Result<CubeTensor, CubeTensor> {
    let dims = x.shape().to_vec();
    let Some((rows, len, s, c)) = norm_layout(&dims, groups, layer_norm) else { return Err(dy) };
    let Some((ex, affine)) = norm_elems(x, gamma, beta, c) else { return Err(dy) };
    if dy.dtype != x.dtype || dy.shape().to_vec() != dims || stats.dtype != DType::F32 || stats.shape().to_vec() != [rows, 2] {
        return Err(dy);
    }
    let (x, dy) = (&contiguous(x.clone()), contiguous(dy));
    let (gamma, beta) = (contiguous(gamma.clone()), contiguous(beta.clone()));
    let (client, device) = (x.client.clone(), x.device.clone());
    let sums = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), vec![rows, 2].into(), DType::F32);
    let io = |args: KernelArguments, t: &CubeTensor, attr: BufferIOAttr| args.with_buffer_io(t.handle.clone().binding(), attr);
    // `beta` only where SiLU reads it (see `norm.rs`).
    let common = || {
        let mut args = KernelArguments::new();
        for t in [x, stats, &gamma] {
            args = io(args, t, BufferIOAttr::ReadOnly);
        }
        if silu {
            args = io(args, &beta, BufferIOAttr::ReadOnly);
        }
        io(args, &dy, BufferIOAttr::ReadOnly)
    };
    let lanes = norm::lanes(len);
    let (gx, gy) = spread(rows.div_ceil((norm::THREADS / lanes) as usize));
    let args = io(common(), &sums, BufferIOAttr::WriteOnly).with_info(params([rows, len, s, c, 0, gx as usize, 0, 0]));
    client.launch(Box::new(Wgsl::Norm(norm::NormKernel::GradSums { lanes, silu, x: ex, affine })), CubeCount::Static(gx, gy, 1), args);
    let dx = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device, dims.into(), ex.dtype());
    let (ax, ay) = spread((rows * len).div_ceil(norm::THREADS as usize));
    let args =
        io(io(common(), &sums, BufferIOAttr::ReadOnly), &dx, BufferIOAttr::WriteOnly).with_info(params([rows, len, s, c, 0, ax as usize, 0, 0]));
    client.launch(Box::new(Wgsl::Norm(norm::NormKernel::GradApply { silu, x: ex, affine })), CubeCount::Static(ax, ay, 1), args);
    Ok(dx)
}

/// `(rows, F)` of a GEGLU input `[.., 2F]` the kernels take; `None` otherwise.
fn geglu_layout(dims: &[usize]) -> Option<(usize, usize)> {
    let last = *dims.last()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    (last % 2 == 0 && last > 0 && rows > 0 && fits_u32(&[dims])).then_some((rows, last / 2))
}

/// GEGLU of `h` `[.., 2F]` (see `geglu.rs`): `h[.., :F] * gelu(h[.., F:])`, `[.., F]`; `Err(h)`
/// where the kernel does not apply (odd last axis, a type other than f32 / f16).
pub fn geglu_cube(h: CubeTensor) -> Result<CubeTensor, CubeTensor> {
    geglu_cube_kept(h).map(|(y, _)| y)
}

/// [`geglu_cube`] that also returns its (contiguous) input: what [`geglu_grad_cube`] reads.
pub fn geglu_cube_kept(h: CubeTensor) -> Result<(CubeTensor, CubeTensor), CubeTensor> {
    let dims = h.shape().to_vec();
    let (Some((rows, f)), Some(ex)) = (geglu_layout(&dims), Elem::of(h.dtype)) else { return Err(h) };
    let h = contiguous(h);
    let mut out = dims;
    *out.last_mut().unwrap() = f;
    let y = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(h.client.clone(), h.device.clone(), out.into(), ex.dtype());
    let (gx, gy) = spread((rows * f).div_ceil(geglu::THREADS as usize));
    let args = KernelArguments::new()
        .with_buffer_io(h.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(y.handle.clone().binding(), BufferIOAttr::WriteOnly)
        .with_info(params([rows, f, gx as usize, 0]));
    h.client.launch(Box::new(Wgsl::Geglu(geglu::GegluKernel { grad: false, x: ex })), CubeCount::Static(gx, gy, 1), args);
    Ok((y, h))
}

/// The gradient of [`geglu_cube`]'s input `h` for the output's gradient `dy` (in `h`'s type);
/// `Err(dy)` where the kernel does not apply.
pub fn geglu_grad_cube(h: &CubeTensor, dy: CubeTensor) -> Result<CubeTensor, CubeTensor> {
    let dims = h.shape().to_vec();
    let (Some((rows, f)), Some(ex)) = (geglu_layout(&dims), Elem::of(h.dtype)) else { return Err(dy) };
    let mut out = dims.clone();
    *out.last_mut().unwrap() = f;
    if dy.dtype != h.dtype || dy.shape().to_vec() != out {
        return Err(dy);
    }
    let (h, dy) = (contiguous(h.clone()), contiguous(dy));
    let dh = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(h.client.clone(), h.device.clone(), dims.into(), ex.dtype());
    let (gx, gy) = spread((rows * f).div_ceil(geglu::THREADS as usize));
    let args = KernelArguments::new()
        .with_buffer_io(h.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(dy.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(dh.handle.clone().binding(), BufferIOAttr::WriteOnly)
        .with_info(params([rows, f, gx as usize, 0]));
    h.client.launch(Box::new(Wgsl::Geglu(geglu::GegluKernel { grad: true, x: ex })), CubeCount::Static(gx, gy, 1), args);
    Ok(dh)
}

/// Our GEGLU outside autodiff on a cubecl device; `Err(h)` where burn's ops must run.
pub fn geglu<const D: usize>(h: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
    on_primitive(h, geglu_cube)
}

/// `kernel` on `x`'s cubecl primitive where our kernels may run (enabled, a cubecl float tensor
/// outside autodiff); `Err(x)` otherwise, or where `kernel` declines.
fn on_primitive<const D: usize>(x: Tensor<D>, kernel: impl FnOnce(CubeTensor) -> Result<CubeTensor, CubeTensor>) -> Result<Tensor<D>, Tensor<D>> {
    if !enabled() {
        return Err(x);
    }
    let Some(c) = primitive(&x) else { return Err(x) };
    kernel(c).map(wrap).map_err(|_| x)
}

/// 0: not yet read from the environment, 1: on, 2: off.
static FLASH: AtomicU8 = AtomicU8::new(0);

/// Whether attention runs on the fused kernel (natively by default; `VISII_FLASH=off` keeps burn's
/// chain with our softmax, for comparisons; the page's `?flash=off`). On in a browser too: on
/// SwiftShader it ran the tiny model's UNet pass at 8 x 8 latents in 7.0 s against 10.8 s.
pub fn flash_enabled() -> bool {
    switch(&FLASH, "VISII_FLASH", "off", true)
}

/// Turns the fused attention on or off for this process (the page's `?flash=on|off`, for diagnosis).
pub fn set_flash(on: bool) {
    FLASH.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fused attention takes `q` `[b, n, heads * d]`, `k` and `v` `[b, m, heads * d]` of
/// these shapes (the element type is checked apart): head dims a multiple of 4 up to [`flash::MAX_HEAD_DIM`],
/// a grid within WebGPU's limits, sizes that fit u32.
pub fn attention_applies(qd: &[usize], kd: &[usize], vd: &[usize], heads: usize) -> bool {
    if qd.len() != 3 || kd.len() != 3 || kd != vd || heads == 0 {
        return false;
    }
    let ([b, n, inner], [kb, m, kinner]) = ([qd[0], qd[1], qd[2]], [kd[0], kd[1], kd[2]]);
    let d = inner / heads;
    let shape_ok = kb == b && kinner == inner && inner % heads == 0 && d % 4 == 0 && (4..=flash::MAX_HEAD_DIM).contains(&d) && n > 0 && m > 0;
    let groups_ok = n.div_ceil(flash::THREADS as usize) <= MAX_GROUPS && b * heads <= MAX_GROUPS;
    shape_ok && groups_ok && fits_u32(&[qd, kd])
}

/// Scaled dot-product attention (see `flash.rs`): `q` `[b, n, heads * d]`, `k` and `v` `[b, m,
/// heads * d]`, giving `[b, n, heads * d]`; `Err` with the inputs where the kernel does not apply.
#[allow(clippy::type_complexity)]
pub fn attention_cube(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    heads: usize,
    causal: bool,
) -> Result<CubeTensor, (CubeTensor, CubeTensor, CubeTensor)> {
    attention_cube_lse(q, k, v, heads, causal, false).map(|(o, _)| o)
}

/// [`attention_cube`] that with `lse` also returns each query row's log-sum-exp of its scaled
/// scores, f32 `[b, heads, n]` (what [`attention_grads_cube`] needs).
#[allow(clippy::type_complexity)]
pub fn attention_cube_lse(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    heads: usize,
    causal: bool,
    lse: bool,
) -> Result<(CubeTensor, Option<CubeTensor>), (CubeTensor, CubeTensor, CubeTensor)> {
    let (qd, kd, vd) = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
    let elem = Elem::of(q.dtype).filter(|&e| k.dtype == e.dtype() && v.dtype == e.dtype());
    let Some(elem) = elem.filter(|_| attention_applies(&qd, &kd, &vd, heads)) else { return Err((q, k, v)) };
    let ([b, n, inner], m) = ([qd[0], qd[1], qd[2]], kd[1]);
    let d = inner / heads;
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let (client, device) = (q.client.clone(), q.device.clone());
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), qd.into(), elem.dtype());
    let stats = lse.then(|| burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device, vec![b, heads, n].into(), DType::F32));
    let scale = ((d as f32).powf(-0.5)).to_bits() as usize;
    let mut args = KernelArguments::new()
        .with_buffer_io(q.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(k.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(v.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly);
    if let Some(l) = &stats {
        args = args.with_buffer_io(l.handle.clone().binding(), BufferIOAttr::WriteOnly);
    }
    let args = args.with_info(params([n, m, inner, inner, heads, scale, 0, 0]));
    let cfg = flash::FlashConfig { d: d as u32, causal, elem, lse, rows: flash_rows(&client, d, 2) };
    let count = CubeCount::Static(n.div_ceil(cfg.rows_per_group() as usize) as u32, (b * heads) as u32, 1);
    client.launch(Box::new(Wgsl::Flash(cfg)), count, args);
    Ok((out, stats))
}

/// Rows per invocation of a fused attention kernel for head dim `d` that keeps `per_row` values of
/// `d` per row in registers (the forward 2: `q`, `o`; dQ 3; dK / dV 4). On a GPU 1 (the most
/// invocations; more rows per invocation is unmeasured there). On CPU adapters, whose lanes load
/// every workgroup-memory value one by one, as many as keep the registers within 320 floats: one
/// staged key then serves 2-4 rows (lavapipe, 1024 x 1024, 8 heads of 40: the forward 3-4x and the
/// backward ~3x faster at 4 rows than at 1; BENCHMARKS.md). Larger footprints compile for too long
/// (lavapipe's LLVM: 51 s for the backward at 80 x 4 rows, 4.5 s at 1 row). [`set_flash_rows`] or
/// natively `VISII_FLASH_ROWS=1|2|4|8` forces the count (the backward takes at most 4), for
/// measurements and tests.
fn flash_rows(client: &Client, d: usize, per_row: usize) -> u32 {
    let forced = match FLASH_ROWS.load(Ordering::Relaxed) {
        0 => {
            #[cfg(not(target_family = "wasm"))]
            let env = std::env::var("VISII_FLASH_ROWS").ok().and_then(|v| v.parse::<u8>().ok()).filter(|r| matches!(r, 1 | 2 | 4 | 8));
            #[cfg(target_family = "wasm")]
            let env: Option<u8> = None;
            let _ = FLASH_ROWS.compare_exchange(0, env.map_or(1, |r| r + 1), Ordering::Relaxed, Ordering::Relaxed);
            return flash_rows(client, d, per_row);
        }
        1 => None,
        v => Some(v as u32 - 1),
    };
    if let Some(r) = forced {
        return if per_row > 2 { r.min(4) } else { r };
    }
    if tiles(client) == Tiles::Gpu {
        return 1;
    }
    [4, 2].into_iter().find(|&r| r * d * per_row <= 320).unwrap_or(1) as u32
}

/// 0: not yet read from the environment, 1: by the adapter ([`flash_rows`]), else 1 + the forced count.
static FLASH_ROWS: AtomicU8 = AtomicU8::new(0);

/// Forces the rows per invocation of the fused attention kernels (1, 2, 4 or 8; the backward
/// takes at most 4); `None`: by the adapter. The result is the same whatever the count (each row's
/// sums in the same order); only the speed and the compile time change.
pub fn set_flash_rows(rows: Option<u32>) {
    let v = rows.filter(|r| matches!(r, 1 | 2 | 4 | 8)).map_or(1, |r| r as u8 + 1);
    FLASH_ROWS.store(v, Ordering::Relaxed);
}

/// Whether [`attention_grads_cube`] takes these shapes: the forward's, and key blocks within the
/// dispatch limit.
pub fn attention_grads_apply(qd: &[usize], kd: &[usize], heads: usize) -> bool {
    attention_applies(qd, kd, kd, heads) && kd[1].div_ceil(flash::THREADS as usize) <= MAX_GROUPS
}

/// The gradients `(dq, dk, dv)` of [`attention_cube`]'s output for the output gradient `g` (see
/// `flash::FlashGradConfig`): `o` and `lse` are what [`attention_cube_lse`] returned for these
/// `q`, `k`, `v`. `Err` with nothing computed where the kernels do not apply.
#[allow(clippy::too_many_arguments)]
pub fn attention_grads_cube(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    o: CubeTensor,
    lse: CubeTensor,
    g: CubeTensor,
    heads: usize,
    causal: bool,
) -> Result<(CubeTensor, CubeTensor, CubeTensor), ()> {
    let (qd, kd) = (q.shape().to_vec(), k.shape().to_vec());
    let elem = Elem::of(q.dtype).filter(|&e| [&k, &v, &o, &g].iter().all(|t| t.dtype == e.dtype()));
    let stats_ok = lse.dtype == DType::F32 && lse.shape().to_vec() == [qd.first().copied().unwrap_or(0), heads, qd.get(1).copied().unwrap_or(0)];
    let same = v.shape().to_vec() == kd && o.shape().to_vec() == qd && g.shape().to_vec() == qd;
    let Some(elem) = elem.filter(|_| stats_ok && same && attention_grads_apply(&qd, &kd, heads)) else { return Err(()) };
    let ([b, n, inner], m) = ([qd[0], qd[1], qd[2]], kd[1]);
    let d = inner / heads;
    let [q, k, v, o, lse, g] = [q, k, v, o, lse, g].map(contiguous);
    let (client, device) = (q.client.clone(), q.device.clone());
    let empty = |shape: Vec<usize>, dtype: DType| burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), shape.into(), dtype);
    let (dq, dk, dv) = (empty(qd.clone(), elem.dtype()), empty(kd.clone(), elem.dtype()), empty(kd.clone(), elem.dtype()));
    let dd = empty(vec![b, heads, n], DType::F32);
    let scale = ((d as f32).powf(-0.5)).to_bits() as usize;
    let info = || params([n, m, inner, inner, heads, scale, 0, 0]);
    let io = |args: KernelArguments, t: &CubeTensor, attr: BufferIOAttr| args.with_buffer_io(t.handle.clone().binding(), attr);
    let (r, wr) = (BufferIOAttr::ReadOnly, BufferIOAttr::WriteOnly);
    let mut args = KernelArguments::new();
    for t in [&q, &k, &v, &o, &g, &lse] {
        args = io(args, t, r);
    }
    let args = io(io(args, &dd, wr), &dq, wr).with_info(info());
    let cfg = |part| {
        let per_row = if part == flash::GradPart::Dq { 3 } else { 4 };
        flash::FlashGradConfig { d: d as u32, causal, elem, part, rows: flash_rows(&client, d, per_row) }
    };
    let groups = |c: flash::FlashGradConfig, len: usize| CubeCount::Static(len.div_ceil(c.rows_per_group() as usize) as u32, (b * heads) as u32, 1);
    let dq_cfg = cfg(flash::GradPart::Dq);
    client.launch(Box::new(Wgsl::FlashGrad(dq_cfg)), groups(dq_cfg, n), args);
    let mut args = KernelArguments::new();
    for t in [&q, &k, &v, &g, &lse, &dd] {
        args = io(args, t, r);
    }
    let args = io(io(args, &dk, wr), &dv, wr).with_info(info());
    let dkdv_cfg = cfg(flash::GradPart::DkDv);
    client.launch(Box::new(Wgsl::FlashGrad(dkdv_cfg)), groups(dkdv_cfg, m), args);
    Ok((dq, dk, dv))
}

/// Our fused attention outside autodiff on a cubecl device; `Err` with the inputs where burn's ops
/// must run (see [`attention_cube`]).
#[allow(clippy::type_complexity)]
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Result<Tensor<3>, (Tensor<3>, Tensor<3>, Tensor<3>)> {
    if !enabled() || !flash_enabled() {
        return Err((q, k, v));
    }
    let (Some(qc), Some(kc), Some(vc)) = (primitive(&q), primitive(&k), primitive(&v)) else { return Err((q, k, v)) };
    attention_cube(qc, kc, vc, heads, causal).map(wrap).map_err(|_| (q, k, v))
}

/// Softmax over the last axis of `x` (see `norm.rs`); `Err` where the kernel does not apply.
pub fn softmax_cube(x: CubeTensor) -> Result<CubeTensor, CubeTensor> {
    let dims = x.shape().to_vec();
    let len = *dims.last().unwrap_or(&0);
    let Some(ex) = Elem::of(x.dtype) else { return Err(x) };
    if dims.is_empty() || len == 0 || !fits_u32(&[&dims]) {
        return Err(x);
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    if rows == 0 {
        return Err(x);
    }
    let x = contiguous(x);
    let (client, device) = (x.client.clone(), x.device.clone());
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), device, dims.into(), ex.dtype());
    let lanes = norm::lanes(len);
    let (gx, gy) = spread(rows.div_ceil((norm::THREADS / lanes) as usize));
    let args = KernelArguments::new()
        .with_buffer_io(x.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly)
        .with_info(params([rows, len, 1, 1, 0, gx as usize, 0, 0]));
    client.launch(Box::new(Wgsl::Norm(norm::NormKernel::Softmax { lanes, x: ex })), CubeCount::Static(gx, gy, 1), args);
    Ok(out)
}

/// Our softmax over the last axis outside autodiff on a cubecl device; `Err(x)` where burn's must
/// run.
pub fn softmax<const D: usize>(x: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
    on_primitive(x, softmax_cube)
}

/// Our GroupNorm (+ SiLU) outside autodiff on a cubecl device; `Err(x)` where burn's must run.
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    norm_with(x, gamma, beta, groups, eps, silu, false)
}

/// Our LayerNorm over the last axis outside autodiff on a cubecl device; `Err(x)` where burn's
/// must run.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: &Tensor<1>, beta: &Tensor<1>, eps: f64) -> Result<Tensor<D>, Tensor<D>> {
    norm_with(x, gamma, beta, 1, eps, false, true)
}

fn norm_with<const D: usize>(
    x: Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
    layer: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    if !enabled() {
        return Err(x);
    }
    let (Some(xc), Some(g), Some(b)) = (primitive(&x), primitive(gamma), primitive(beta)) else { return Err(x) };
    group_norm_cube(xc, &g, &b, groups, eps, silu, layer).map(wrap).map_err(|_| x)
}

/// The int8 weight `base` (a quantised tensor on a cubecl device) where our kernels read it in place
/// ([`q8_enabled`], [`Q8::of`]).
pub(crate) fn q8_base<const W: usize>(base: &Tensor<W>) -> Option<Q8> {
    if !enabled() || !q8_enabled() {
        return None;
    }
    match base.clone().into_dispatch() {
        DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Quantized(q)), .. } => Q8::of(&q),
        _ => None,
    }
}

/// `x · W + bias (+ residual)` outside autodiff for an int8-resident weight `base` of real shape
/// `wdims` `[K, N]`, read in place; `Err(x)` where it cannot be.
pub fn linear_q8<const D: usize, const W: usize>(
    x: Tensor<D>,
    base: &Tensor<W>,
    wdims: [usize; 2],
    bias: Option<&Tensor<1>>,
    residual: Option<&Tensor<D>>,
) -> Result<Tensor<D>, Tensor<D>> {
    let Some(q8) = q8_base(base) else { return Err(x) };
    let Some((xc, bc, rc)) = input_primitives(&x, bias, residual) else { return Err(x) };
    linear_weight(xc, Weight::Q8(q8), wdims, bc, rc, skinny_enabled()).map(wrap).map_err(|_| x)
}

/// A conv (`+ residual`, see [`conv2d`]) outside autodiff for an int8-resident weight `base` of real
/// shape `wdims`, read in place; `Err(x)` where it cannot be.
pub fn conv2d_q8<const W: usize>(
    x: Tensor<4>,
    base: &Tensor<W>,
    wdims: [usize; 4],
    bias: Option<&Tensor<1>>,
    residual: Option<&Tensor<4>>,
    options: &ConvOptions<2>,
) -> Result<Tensor<4>, Tensor<4>> {
    let Some(q8) = q8_base(base) else { return Err(x) };
    let Some((xc, bc, rc)) = input_primitives(&x, bias, residual) else { return Err(x) };
    conv2d_weight(xc, Weight::Q8(q8), wdims, bc, rc, options, skinny_enabled()).map(wrap).map_err(|_| x)
}

/// The cubecl primitive of a float tensor outside autodiff, if it is one.
pub(crate) fn primitive<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    match t.clone().into_dispatch() {
        DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Float(c)), autodiff: DispatchAutodiffContext::Disabled } => Some(c),
        _ => None,
    }
}

pub(crate) fn wrap<const D: usize>(c: CubeTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor { kind: DispatchTensorKind::Cube(BackendTensor::Float(c)), autodiff: DispatchAutodiffContext::Disabled })
}

/// The primitives of `x`, `bias` and `residual` where our kernels may run (enabled, all cubecl float
/// tensors outside autodiff).
#[allow(clippy::type_complexity)]
fn input_primitives<const D: usize, const R: usize>(
    x: &Tensor<D>,
    bias: Option<&Tensor<1>>,
    residual: Option<&Tensor<R>>,
) -> Option<(CubeTensor, Option<CubeTensor>, Option<CubeTensor>)> {
    if !enabled() {
        return None;
    }
    let bias = match bias.map(primitive) {
        Some(None) => return None,
        Some(b) => b,
        None => None,
    };
    let residual = match residual.map(primitive) {
        Some(None) => return None,
        Some(r) => r,
        None => None,
    };
    Some((primitive(x)?, bias, residual))
}

/// Our conv2d for a tensor outside autodiff on a cubecl device, `+ residual` where given (of the
/// output's shape, or `[n, c_out, 1, 1]`: one value per image and channel; in `x`'s type) in the same
/// kernel; `Err(x)` where burn's must run.
pub fn conv2d(x: Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>, residual: Option<&Tensor<4>>, options: &ConvOptions<2>) -> Result<Tensor<4>, Tensor<4>> {
    conv2d_on(x, weight, bias, residual, options, skinny_enabled())
}

/// [`conv2d`] with the skinny kernel allowed or not (parity tests run both paths).
pub fn conv2d_on(
    x: Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    residual: Option<&Tensor<4>>,
    options: &ConvOptions<2>,
    skinny: bool,
) -> Result<Tensor<4>, Tensor<4>> {
    let Some((xc, bc, rc)) = input_primitives(&x, bias, residual) else { return Err(x) };
    let Some(wc) = primitive(weight) else { return Err(x) };
    let wdims = wc.shape().dims::<4>();
    conv2d_weight(xc, Weight::Float(wc), wdims, bc, rc, options, skinny).map(wrap).map_err(|_| x)
}

/// Our `x · weight + bias` (weight `[K, N]`) outside autodiff on a cubecl device, `+ residual` (of the
/// output's shape and `x`'s type) where given, in the same kernel; `Err(x)` where burn's must run.
pub fn linear<const D: usize>(x: Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>, residual: Option<&Tensor<D>>) -> Result<Tensor<D>, Tensor<D>> {
    linear_on(x, weight, bias, residual, skinny_enabled())
}

/// [`linear`] with the skinny kernel allowed or not (parity tests run both paths).
pub fn linear_on<const D: usize>(
    x: Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    residual: Option<&Tensor<D>>,
    skinny: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    let Some((xc, bc, rc)) = input_primitives(&x, bias, residual) else { return Err(x) };
    let Some(wc) = primitive(weight) else { return Err(x) };
    let wdims = wc.shape().dims::<2>();
    linear_weight(xc, Weight::Float(wc), wdims, bc, rc, skinny).map(wrap).map_err(|_| x)
}
