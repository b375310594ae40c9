//! One tiled GEMM in plain WGSL (no subgroups, no cooperative matrices) that is also an implicit-GEMM
//! convolution: `C[m, p] = sum_k A[m, k] * B[k, p] (+ bias) (+ residual)`, the residual ([`Residual`])
//! read as `C` is written: a skip connection added in the layer's own kernel rather than by a pass of
//! its own over the output. Whether there is one and how it is laid out are parameters (its strides),
//! not part of the compiled variant, so a layer with a residual runs the same pipeline as one without
//! (each variant costs a shader compilation on the first run: 31 more in a learning step when the
//! residual's kind was compiled in).
//!
//! - `A` is row-major `[M, K]`: a conv weight `[c_out, c_in, kh, kw]` as it is stored (no per-call
//!   layout copy), or a Linear's input rows.
//! - `B` is read straight from an NCHW image batch `[n, c_in, h, w]` as the im2col matrix
//!   (`k = (ci, ky, kx)`, `p = (image, oy, ox)`) without ever building it; for a pointwise (1x1,
//!   stride 1, no padding) conv it is the image itself, and a Linear's weight `[K, N]` is a
//!   one-image pointwise case (`c_in = K`, `h * w = N`).
//! - `C` is written NCHW `[n, c_out, oh, ow]` (a Linear: `[M, N]`), bias per row (conv) or per
//!   column (Linear). The bias too is a parameter ([`Bias::mode`]), not part of the variant: a
//!   Linear with a bias and one without (an attention's `to_out` and `to_q`) run one pipeline.
//!
//! Each workgroup of `wg_x * wg_y` invocations computes a `BM x BN = 4 hm wg_y x 4 hn wg_x` tile of
//! `C`; on GPUs every invocation an 8 x 8 block (`hm = hn = 2`) held as 16 `vec4` registers (two
//! 4-row by two 4-column halves, so its workgroup-memory reads are `vec4`s of consecutive rows /
//! columns). `K` advances in steps of
//! 8: the `A` tile is staged transposed (`[k][m]`) and the `B` tile as `[k][p]` in workgroup memory.
//! The shape of the design (128 x 128 tiles, 8 x 8 per invocation, transposed `A`) is the one that
//! measured 30 TFLOP/s of f32 through Dawn on an H200 (issue 19); sizes, strides, padding and the
//! kernel geometry are parameters, so every conv and Linear of the models runs on it.
//!
//! On lavapipe the variants are widened to 16 x 16 outputs per invocation and the operands
//! loaded four values at a time where their layout allows (`A` then staged row-major, `[m][k]`);
//! every adapter stores `C` four columns at a time where the output's pixels per image are a
//! multiple of 4 ([`GemmConfig::for_problem`]).
//!
//! The WGSL is generated for each [`GemmConfig`] (the unrolled inner product and the constant
//! divisors of the im2col index) and handed to cubecl as a precompiled kernel, so it runs on
//! wgpu natively (Vulkan, lavapipe) and on WebGPU in a browser alike.

use super::{Elem, Elems};
use std::fmt::Write;

/// How `B` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BLayout {
    /// `B[k, p] = X[image, k, pix]`: a 1x1 conv with stride 1 and no padding, or a Linear.
    Pointwise,
    /// `B[k, p] = X[p, k]` for one image: `x · Wᵀ` with `W` `[N, K]` as stored (a Linear's backward).
    PointwiseT,
    /// The im2col view of `X` for a `kh x kw` kernel with these strides and top / left padding
    /// (the bottom / right padding only shows in the output size: those reads are zeros).
    Conv { kh: u32, kw: u32, sh: u32, sw: u32, ph: u32, pw: u32 },
}

/// How `A` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ALayout {
    /// Row-major `[M, K]`.
    RowMajor,
    /// A conv weight `[c_out, c_in, kh, kw]` read as the weight of the transposed conv (the input
    /// gradient of a stride-1 conv): `A[ci, (co, r)] = W[co, ci, kk - 1 - r]` with `kk = kh * kw`.
    ConvFlipped { kk: u32 },
}

/// Which axis of `C` the bias runs along. Every variant declares a binding `bias` (after `b`) and
/// reads it as the launch parameter [`Self::mode`] says (a uniform branch; a placeholder buffer is
/// bound where there is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bias {
    None,
    /// One value per row `m` (a conv's output channel).
    Row,
    /// One value per column `p` (a Linear's output feature).
    Col,
}

impl Bias {
    /// The kernels' parameter `p.bias`: 0 none, 1 per row, 2 per column.
    pub fn mode(self) -> usize {
        match self {
            Bias::None => 0,
            Bias::Row => 1,
            Bias::Col => 2,
        }
    }
}

/// What the epilogue adds to each sum after the bias, read in `C`'s type: nothing, a tensor laid
/// out as `C` (a residual: a skip connection, an attention's input), or one value per image and row
/// (`[n, M]`, broadcast over the image's pixels: a resnet's time embedding per image and channel).
/// Every variant reads it at `image * rimg + m * rm + pixel * rpix` ([`Residual::strides`]; `rm = 0`:
/// none), from a binding `res` after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Residual {
    None,
    Full,
    PerImage,
}

impl Residual {
    /// `(rimg, rm, rpix)` for a problem of `m` rows and `ohw` columns per image (the kernels' terms).
    pub fn strides(self, m: usize, ohw: usize) -> [usize; 3] {
        match self {
            Residual::None => [0, 0, 0],
            Residual::Full => [m * ohw, ohw, 1],
            Residual::PerImage => [m, 1, 0],
        }
    }
}

/// A compiled variant of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// Invocations along `p` (columns).
    pub wg_x: u32,
    /// Invocations along `m` (rows).
    pub wg_y: u32,
    /// Output rows per invocation in groups of 4 (1, 2, or 4 on lavapipe): the tile is `4 * hm * wg_y` high.
    pub hm: u32,
    /// Output columns per invocation in groups of 4 (1, 2, or 4 on lavapipe): the tile is `4 * hn * wg_x` wide.
    pub hn: u32,
    pub a: ALayout,
    pub b: BLayout,
    /// The operands' element types (f32, or f16 for f16 activations; see [`Elem`]).
    pub elems: Elems,
    /// `C` written four columns at a time (`vec4` stores; the output's pixels per image `ohw` must
    /// be a multiple of 4, see [`Self::for_problem`]).
    pub c4: bool,
    /// `A` (row-major, `K` a multiple of 4) read four `k` at a time and staged row-major (`[m][k]`)
    /// in workgroup memory (see [`Self::for_problem`]).
    pub a4: bool,
    /// `B` (pointwise, `ohw` a multiple of 4) read four columns at a time.
    pub b4: bool,
}

/// The step along `K`.
pub const BK: u32 = 8;

/// The shapes `(wg_x, wg_y, hm, hn)` compiled for GPUs: 8 x 8 outputs per invocation in square
/// and half tiles for large problems, narrow ones (8 to 32 columns) for the few pixels of the
/// deepest UNet levels, flat ones (8 to 32 rows) for Linear layers over a few tokens, and 80 rows
/// for CLIP's 77 text states (the cross-attention keys and values: a 128-row tile there is 40%
/// padding, and ten 8-row ones run 16 invocations each; on lavapipe 77 x 768 -> 1280 30 -> 20 ms).
/// Ahead of the narrow and flat ones, so that it wins their ties.
pub const VARIANTS: [(u32, u32, u32, u32); 11] = [
    (16, 16, 2, 2),
    (16, 8, 2, 2),
    (8, 16, 2, 2),
    (8, 8, 2, 2),
    (16, 10, 2, 2),
    (1, 16, 2, 2),
    (2, 16, 2, 2),
    (4, 16, 2, 2),
    (16, 1, 2, 2),
    (16, 2, 2, 2),
    (16, 4, 2, 2),
];

/// The shapes for SwiftShader (Chrome's CPU WebGPU, the headless tests' adapter): 4 x 4 outputs
/// per invocation. With the 8 x 8 shapes its shader JIT made Chromium's GPU process grow past
/// 12 GB during the e2e's learning run; with these it stays under 0.4 GB (the e2e's 4 learning
/// steps: 112.5 s with all our kernels, ~190 s with burn's).
pub const CPU_VARIANTS: [(u32, u32, u32, u32); 8] =
    [(16, 16, 1, 1), (16, 8, 1, 1), (8, 16, 1, 1), (8, 8, 1, 1), (2, 16, 1, 1), (4, 16, 1, 1), (16, 2, 1, 1), (16, 4, 1, 1)];

impl GemmConfig {
    pub fn bm(&self) -> u32 {
        4 * self.hm * self.wg_y
    }
    pub fn bn(&self) -> u32 {
        4 * self.hn * self.wg_x
    }
    pub fn threads(&self) -> u32 {
        self.wg_x * self.wg_y
    }

    /// The tile for an `m x n` output among `variants`: the one that wastes the least work on
    /// padding, the earlier (larger) on a tie. (Small problems on a large GPU would want more
    /// workgroups: a split along K is not done yet.)
    pub fn pick_from(variants: &[(u32, u32, u32, u32)], m: usize, n: usize, a: ALayout, b: BLayout) -> Self {
        let work = |&(x, y, hm, hn): &(u32, u32, u32, u32)| {
            let (bm, bn) = ((4 * hm * y) as usize, (4 * hn * x) as usize);
            m.div_ceil(bm) * n.div_ceil(bn) * bm * bn
        };
        // Least padded work: at 8 x 8 latents the deepest UNet levels have 1 to 4 pixels, where a
        // 64-wide tile would compute 16 to 64 times what is needed.
        let mut best = variants[0];
        for v in variants {
            if work(v) < work(&best) {
                best = *v;
            }
        }
        let (wg_x, wg_y, hm, hn) = best;
        GemmConfig { wg_x, wg_y, hm, hn, a, b, elems: Elems::F32, c4: false, a4: false, b4: false }
    }

    /// The tile for lavapipe: the least padded work over the rate a workgroup of that many
    /// invocations reaches there (measured, Linear 77 x 768 -> 1280 and 640 -> 5120 over 16 rows,
    /// 3x3 conv 320 -> 320 at 8 x 8: 16 invocations ~3.0 GFLOP/s of padded work, 32 ~4.6, 64 ~6.5,
    /// 128 ~7.8, 256 ~9.0: each invocation is a SIMD lane and a workgroup runs on one core, so a small
    /// one pays its per-step overhead on few lanes).
    pub fn pick_lavapipe(m: usize, n: usize, a: ALayout, b: BLayout) -> Self {
        let rate = |threads: u32| match threads {
            0..=16 => 3.0,
            17..=32 => 4.6,
            33..=64 => 6.5,
            65..=128 => 7.8,
            _ => 9.0,
        };
        let cost = |&(x, y, hm, hn): &(u32, u32, u32, u32)| {
            let (bm, bn) = ((4 * hm * y) as usize, (4 * hn * x) as usize);
            (m.div_ceil(bm) * n.div_ceil(bn) * bm * bn) as f64 / rate(x * y)
        };
        let mut best = VARIANTS[0];
        for v in &VARIANTS {
            if cost(v) < cost(&best) {
                best = *v;
            }
        }
        let (wg_x, wg_y, hm, hn) = best;
        GemmConfig { wg_x, wg_y, hm, hn, a, b, elems: Elems::F32, c4: false, a4: false, b4: false }
    }

    /// `shape` (one of [`VARIANTS`]) with 16 instead of 8 rows and columns per invocation where its
    /// workgroup has an even number of invocations along them: the same tile with a quarter (half) of
    /// the invocations.
    pub fn widened((wg_x, wg_y, hm, hn): (u32, u32, u32, u32)) -> (u32, u32, u32, u32) {
        let (wg_x, hn) = if wg_x % 2 == 0 && hn == 2 { (wg_x / 2, 4) } else { (wg_x, hn) };
        let (wg_y, hm) = if wg_y % 2 == 0 && hm == 2 { (wg_y / 2, 4) } else { (wg_y, hm) };
        (wg_x, wg_y, hm, hn)
    }

    /// This variant for a problem with `k` terms per sum and an output of `ohw` pixels per image (a
    /// Linear: its output features): `C` stored four columns at a time where `ohw` is a multiple of
    /// 4 ([`Self::c4`]); on lavapipe (`lavapipe`) also 16 x 16 outputs per invocation
    /// ([`Self::widened`]) and the operands loaded four values at a time where their layout allows
    /// ([`Self::a4`], [`Self::b4`]).
    ///
    /// Lavapipe (Mesa 22.3's llvmpipe, disassembled) runs every load from and store to memory,
    /// workgroup memory too, as a loop over its SIMD lanes: ~32 instructions per lane for a `vec4`,
    /// ~20 for one value, against two per 8-lane multiply-add, so an invocation's sums per value
    /// loaded set its speed, and wide loads its loaders' (BENCHMARKS.md). With scalar stores (256
    /// guarded ones per invocation) a 16 x 16 variant took LLVM 3.6 s to compile, with `vec4` stores
    /// ~1.2 s, so it is used only where they are possible, and only with f32 operands (f16 ones took
    /// ~2.4 s: not a real use of a CPU adapter, but the tests run them; int8 weights read in place,
    /// `--resident q8`, keep 8 x 8 too: widened, the full UNet's forward at 8 x 8 latents ran 3.1-3.2
    /// -> 2.6-2.9 s, but its learning step's first run, compiling, 67 -> 110 s and the `resident_q8`
    /// test's from an empty Mesa cache 140 -> 211 s).
    pub fn for_problem(self, k: usize, ohw: usize, lavapipe: bool) -> Self {
        let c4 = ohw % 4 == 0;
        let (wg_x, wg_y, hm, hn) = if c4 && lavapipe && self.elems == Elems::F32 {
            Self::widened((self.wg_x, self.wg_y, self.hm, self.hn))
        } else {
            (self.wg_x, self.wg_y, self.hm, self.hn)
        };
        let a4 = lavapipe && self.a == ALayout::RowMajor && k % 4 == 0 && self.elems.a.reads4();
        let b4 = lavapipe && self.b == BLayout::Pointwise && c4 && self.elems.b.reads4();
        GemmConfig { wg_x, wg_y, hm, hn, c4, a4, b4, ..self }
    }

    /// This variant with the operands' element types `elems`.
    pub fn with(self, elems: Elems) -> Self {
        GemmConfig { elems, ..self }
    }

    /// [`Self::pick_from`] the GPU variants.
    pub fn pick(m: usize, n: usize, a: ALayout, b: BLayout) -> Self {
        Self::pick_from(&VARIANTS, m, n, a, b)
    }

    /// The WGSL source of this variant; entry point `main`.
    pub fn wgsl(&self) -> String {
        let (wg_x, wg_y, t, hm, hn) = (self.wg_x, self.wg_y, self.threads(), self.hm, self.hn);
        let (bm, bn) = (self.bm(), self.bn());
        let shape = (wg_x, wg_y, hm, hn);
        assert!(
            VARIANTS.contains(&shape) || CPU_VARIANTS.contains(&shape) || VARIANTS.iter().any(|&v| Self::widened(v) == shape),
            "unsupported GEMM variant {shape:?}"
        );
        // Whether each invocation loads one fixed column of the B tile (else columns vary per pass).
        let fixed_col = t % bn == 0 && !self.b4;
        let mut s = String::new();
        let w = &mut s;
        // Params: m, n, k, ohw (output pixels per image), ow, h, w, img (input values per image).
        // Every buffer is declared read_write: natively cubecl carves tensors out of shared buffers,
        // and one buffer bound read-only and read-write in the same dispatch is invalid.
        // Values are read into f32 (the tiles and sums are f32) and written in `c`'s type.
        let e = self.elems;
        Elem::enable(w, &[e.a, e.b, e.bias, e.c]);
        let _ = writeln!(
            w,
            "struct Params {{ m: u32, n: u32, k: u32, ohw: u32, ow: u32, h: u32, w: u32, img: u32, rimg: u32, rm: u32, rpix: u32, bias: u32 }}"
        );
        // Bindings in order: a (and its scales), b (and its scales), bias, residual, c, the parameters.
        let mut next = 0;
        if self.a4 {
            e.a.declare4(w, "a", &mut next);
        } else {
            e.a.declare(w, "a", &mut next);
        }
        if self.b4 {
            e.b.declare4(w, "b", &mut next);
        } else {
            e.b.declare(w, "b", &mut next);
        }
        // The bias (a placeholder buffer where there is none: `p.bias == 0`) and the residual (one
        // where there is none: `p.rm == 0`).
        e.bias.declare(w, "bias", &mut next);
        e.c.declare(w, "res", &mut next);
        if self.c4 {
            e.c.declare4(w, "c", &mut next);
        } else {
            e.c.declare(w, "c", &mut next);
        }
        let _ = writeln!(w, "@group(0) @binding({next}) var<uniform> p: Params;");
        let _ = writeln!(w, "var<workgroup> sa: array<vec4<f32>, {}>;", BK * bm / 4);
        let _ = writeln!(w, "var<workgroup> sb: array<vec4<f32>, {}>;", BK * bn / 4);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let tx = t % {wg_x}u; let ty = t / {wg_x}u;");
        let _ = writeln!(w, "  let m0 = wid.y * {bm}u; let n0 = wid.x * {bn}u;");
        // The B loader's column (one output pixel) and its image coordinates: once, where every
        // pass loads the same column or (BN a multiple of the invocation count T) each invocation
        // the same `ncol` columns `t + j * T`, else in each pass (the divisions by `p.ohw` and
        // `p.ow` are by values only known at run time: on CPU adapters a scalar `div` per SIMD lane).
        // With `b4` the loader works on groups of four columns instead (below).
        let ncol = if !fixed_col && !self.b4 && bn % t == 0 { bn / t } else { 0 };
        let column = |w: &mut String, indent: &str, sfx: &str| {
            // Past the last column: load the last one (valid memory), zeroed by `pvalid`.
            let _ = writeln!(w, "{indent}let pvalid{sfx} = n0 + bcol{sfx} < p.n; let pc{sfx} = min(n0 + bcol{sfx}, p.n - 1u);");
            let _ = writeln!(w, "{indent}let ppix{sfx} = pc{sfx} % p.ohw; let xbase{sfx} = (pc{sfx} / p.ohw) * p.img;");
            if let BLayout::Conv { sh, sw, ph, pw, .. } = self.b {
                let _ = writeln!(
                    w,
                    "{indent}let iy0{sfx} = i32((ppix{sfx} / p.ow) * {sh}u) - {ph}; let ix0{sfx} = i32((ppix{sfx} % p.ow) * {sw}u) - {pw};"
                );
            }
        };
        let _ = writeln!(w, "  let hw = p.h * p.w;");
        if fixed_col {
            let _ = writeln!(w, "  let bcol = t % {bn}u; let brow = t / {bn}u;");
            column(w, "  ", "");
        }
        for j in 0..ncol {
            let _ = writeln!(w, "  let bcol{j} = t + {}u;", j * t);
            column(w, "  ", &j.to_string());
        }
        for i in 0..4 * hm * hn {
            let _ = writeln!(w, "  var c{i} = vec4<f32>(0.0);");
        }
        let _ = writeln!(w, "  for (var k0 = 0u; k0 < p.k; k0 = k0 + {BK}u) {{");
        if self.a4 {
            // A: BM rows x two groups of 4 k, staged as `sa[m * 2 + q]` (`K` is a multiple of 4: a
            // group is inside the matrix or outside it whole).
            let a_quads = 2 * bm;
            for pass in 0..a_quads.div_ceil(t) {
                let guard = if (pass + 1) * t > a_quads { format!("if (e < {a_quads}u) ") } else { String::new() };
                let _ = writeln!(w, "    {{ let e = t + {}u; {guard}{{ let m = e / 2u; let gm = m0 + m; let gk = k0 + (e % 2u) * 4u;", pass * t);
                let _ = writeln!(
                    w,
                    "      let am = min(gm, p.m - 1u); let ak = min(gk, p.k - 4u); sa[e] = select(vec4<f32>(0.0), {}, (gm < p.m) & (gk < p.k)); }} }}",
                    e.a.read4("a", "(am * p.k + ak) / 4u")
                );
            }
        } else {
            // A: BM rows x 8 k; consecutive invocations take consecutive k of one row.
            let a_elems = BK * bm;
            for pass in 0..a_elems.div_ceil(t) {
                let guard = if (pass + 1) * t > a_elems { format!("if (e < {a_elems}u) ") } else { String::new() };
                // Every load is from valid memory (indices clamped) and zeroed outside the matrix with a
                // `select`, without a branch: on SwiftShader and lavapipe (CPU adapters) a branch around a
                // load costs more than the load, and many of them blew up SwiftShader's compiler.
                let load = match self.a {
                    ALayout::RowMajor => e.a.read("a", "am * p.k + ak"),
                    ALayout::ConvFlipped { kk } => e.a.read("a", &format!("(ak / {kk}u) * p.m * {kk}u + am * {kk}u + {}u - ak % {kk}u", kk - 1)),
                };
                let _ = writeln!(
                    w,
                    "    {{ let e = t + {}u; {guard}{{ let m = e / {BK}u; let kk = e % {BK}u; let gm = m0 + m; let gk = k0 + kk;",
                    pass * t
                );
                let _ = writeln!(
                    w,
                    "      let am = min(gm, p.m - 1u); let ak = min(gk, p.k - 1u); let v = select(0.0, {load}, (gm < p.m) & (gk < p.k));"
                );
                let _ = writeln!(w, "      let f = kk * {bm}u + m; sa[f / 4u][f % 4u] = v; }} }}");
            }
        }
        // B: 8 k x BN columns.
        let b_elems = BK * bn;
        if self.b4 {
            // Four columns at a time (`ohw` and each image's values are multiples of 4: a group of
            // columns is one image's, whole where its first column is inside).
            let quads = bn / 4;
            let b_quads = BK * quads;
            for pass in 0..b_quads.div_ceil(t) {
                let guard = if (pass + 1) * t > b_quads { format!("if (e < {b_quads}u) ") } else { String::new() };
                let _ = writeln!(w, "    {{ let e = t + {}u; {guard}{{ let kr = e / {quads}u; let cq = e % {quads}u; let gk = k0 + kr;", pass * t);
                let _ = writeln!(w, "      let pc = min(n0 + cq * 4u, p.n - 4u); let bk = min(gk, p.k - 1u);");
                let idx = "((pc / p.ohw) * p.img + bk * p.ohw + pc % p.ohw) / 4u";
                let _ = writeln!(w, "      sb[e] = select(vec4<f32>(0.0), {}, (n0 + cq * 4u < p.n) & (gk < p.k)); }} }}", e.b.read4("b", idx));
            }
        } else {
            for pass in 0..b_elems.div_ceil(t) {
                let guard = if (pass + 1) * t > b_elems { format!("if (t + {}u < {b_elems}u) ", pass * t) } else { String::new() };
                if fixed_col {
                    let _ =
                        writeln!(w, "    {guard}{{ let kr = brow + {}u; let gk = k0 + kr; let bk = min(gk, p.k - 1u); var v = 0.0;", pass * (t / bn));
                } else if ncol > 0 {
                    // Pass `i` loads column `t + (i % ncol) * T` at row `i / ncol` of the tile.
                    let j = pass % ncol;
                    let _ = writeln!(w, "    {{ let kr = {}u; let gk = k0 + kr; let bk = min(gk, p.k - 1u); var v = 0.0;", pass / ncol);
                    let _ = write!(w, "      let bcol = bcol{j}; let pvalid = pvalid{j}; let ppix = ppix{j}; let xbase = xbase{j};");
                    if let BLayout::Conv { .. } = self.b {
                        let _ = write!(w, " let iy0 = iy0{j}; let ix0 = ix0{j};");
                    }
                    let _ = writeln!(w);
                } else {
                    let _ =
                    writeln!(w, "    {guard}{{ let e = t + {}u; let kr = e / {bn}u; let bcol = e % {bn}u; let gk = k0 + kr; let bk = min(gk, p.k - 1u); var v = 0.0;", pass * t);
                    column(w, "      ", "");
                }
                match self.b {
                    BLayout::Pointwise => {
                        let _ = writeln!(w, "      v = select(0.0, {}, pvalid & (gk < p.k));", e.b.read("b", "xbase + bk * p.ohw + ppix"));
                    }
                    BLayout::PointwiseT => {
                        let _ = writeln!(w, "      v = select(0.0, {}, pvalid & (gk < p.k));", e.b.read("b", "ppix * p.k + bk"));
                    }
                    BLayout::Conv { kh, kw, .. } => {
                        let kk = kh * kw;
                        let _ = writeln!(
                            w,
                            "      let ci = bk / {kk}u; let r = bk % {kk}u; let iy = iy0 + i32(r / {kw}u); let ix = ix0 + i32(r % {kw}u);"
                        );
                        let _ = writeln!(w, "      v = {};", super::image_value(e.b, "b", "xbase + ci * hw", "iy", "ix", "pvalid & (gk < p.k) & "));
                    }
                }
                let _ = writeln!(w, "      let f = kr * {bn}u + bcol; sb[f / 4u][f % 4u] = v; }}");
            }
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        // The block: rows `h * BM / hm + ty * 4 + i` (h < hm, i < 4), columns likewise.
        let comps = ["x", "y", "z", "w"];
        for kk in 0..BK {
            if self.a4 && kk % 4 == 0 {
                // Each of the invocation's rows: its 4 k of this group.
                for i in 0..4 * hm {
                    let _ = writeln!(w, "    let r{}_{i} = sa[({}u + ty * 4u) * 2u + {}u];", kk / 4, (i / 4) * (bm / hm) + i % 4, kk / 4);
                }
            }
            let _ = write!(w, "    {{");
            if !self.a4 {
                for h in 0..hm {
                    let _ = write!(w, " let a{h} = sa[{}u + ty];", kk * bm / 4 + h * bm / (4 * hm));
                }
            }
            for h in 0..hn {
                let _ = write!(w, " let b{h} = sb[{}u + tx];", kk * bn / 4 + h * bn / (4 * hn));
            }
            let _ = writeln!(w);
            for i in 0..4 * hm as usize {
                // Row i at this k: with `a4` component `kk % 4` of its group's four k.
                let a = if self.a4 { format!("r{}_{i}.{}", kk / 4, comps[kk as usize % 4]) } else { format!("a{}.{}", i / 4, comps[i % 4]) };
                for h in 0..hn as usize {
                    let r = i * hn as usize + h;
                    let _ = write!(w, " c{r} = fma(vec4<f32>({a}), b{h}, c{r});");
                }
            }
            let _ = writeln!(w, " }}");
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        let _ = writeln!(w, "  }}");
        // Store: per column its output offset (image * M * ohw + pixel) and bias, then every row.
        let row = |i: u32| format!("{}u + ty * 4u + {}u", (i / 4) * (bm / hm), i % 4);
        // With `c4` four columns at a time: `ohw` is a multiple of 4, so a group of four never
        // straddles two images, starts on a multiple of 4 and is whole wherever its first column is
        // inside. Group `g` of `width` columns starts at column `first(g)` of the invocation's block.
        let (groups, width) = if self.c4 { (hn, 4) } else { (4 * hn, 1) };
        let first = |g: u32| format!("{}u + tx * 4u + {}u", (g * width / 4) * (bn / hn), g * width % 4);
        let (per4, splat, zero) = if self.c4 { (" / 4u", "vec4<f32>(bv)", "vec4<f32>(0.0)") } else { ("", "bv", "0.0") };
        for g in 0..groups {
            let _ = writeln!(w, "  let q{g} = n0 + {}; let o{g} = ((q{g} / p.ohw) * p.m * p.ohw + q{g} % p.ohw){per4};", first(g));
            // A bias per column (`p.bias == 2`): read once per group of columns (a uniform branch).
            let reads: Vec<String> = (0..width).map(|j| e.bias.read("bias", &format!("min(q{g} + {j}u, p.n - 1u)"))).collect();
            let reads = if self.c4 { format!("vec4<f32>({})", reads.join(", ")) } else { reads.join("") };
            let _ = writeln!(w, "  var bc{g} = {zero}; if (p.bias == 2u) {{ bc{g} = {reads}; }}");
            // The residual's offset for the group's first column (its image, its pixel).
            let _ = writeln!(w, "  let rq{g} = (q{g} / p.ohw) * p.rimg + (q{g} % p.ohw) * p.rpix;");
        }
        for i in 0..4 * hm {
            let _ = writeln!(w, "  {{ let m = m0 + {}; if (m < p.m) {{ let ro = m * (p.ohw{per4});", row(i));
            // A bias per row (`p.bias == 1`). With none, or one per column, `bv` is 0: the sum plus
            // `bv + bc` is the sum plus the one bias there is, to the last bit.
            let _ = writeln!(w, "    var bv = 0.0; if (p.bias == 1u) {{ bv = {}; }}", e.bias.read("bias", "m"));
            for g in 0..groups {
                let reg = if self.c4 { format!("c{}", i * hn + g) } else { format!("c{}[{}]", i * hn + g / 4, g % 4) };
                let v = format!("{reg} + ({splat} + bc{g})");
                // The residual, read inside the column's guard (a uniform branch: none where `p.rm` is 0).
                let at = |j: u32| e.c.read("res", &format!("rq{g} + m * p.rm + {j}u * p.rpix"));
                let res = if self.c4 { format!("vec4<f32>({}, {}, {}, {})", at(0), at(1), at(2), at(3)) } else { at(0) };
                let store = if self.c4 { e.c.store4("v") } else { e.c.store("v") };
                let _ = writeln!(w, "    if (q{g} < p.n) {{ var v = {v}; if (p.rm != 0u) {{ v = v + {res}; }} c[o{g} + ro] = {store}; }}");
            }
            let _ = writeln!(w, "  }} }}");
        }
        let _ = writeln!(w, "}}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_valid_wgsl_shape() {
        // The generator's arithmetic: loads cover the tiles exactly.
        let shapes = VARIANTS.into_iter().chain(CPU_VARIANTS).chain(VARIANTS.map(GemmConfig::widened));
        for ((wg_x, wg_y, hm, hn), fours) in shapes.flat_map(|s| [(s, false), (s, true)]) {
            let b = if fours { BLayout::Pointwise } else { BLayout::Conv { kh: 3, kw: 3, sh: 2, sw: 2, ph: 0, pw: 0 } };
            let (a, c4, a4, b4) = (ALayout::RowMajor, fours, fours, fours);
            let c = GemmConfig { wg_x, wg_y, hm, hn, a, b, elems: Elems::F32, c4, a4, b4 };
            assert!(c.bm() % 4 == 0 && c.bn() % 4 == 0 && c.bm() / 4 / hm == wg_y && c.bn() / 4 / hn == wg_x);
            let src = c.wgsl();
            assert!(src.contains("@workgroup_size") && src.contains("bias[m]"));
            // Every sum is stored: 16 hm hn values per invocation, in fours or one at a time.
            let stores = src.matches("c[o").count() as u32;
            assert_eq!(stores, if fours { 4 * hm * hn } else { 16 * hm * hn }, "{src}");
            // Workgroup memory is written as much as it holds: vec4s (A and B in fours) or values.
            let (sa, sb) = (src.matches("sa[e] =").count() as u32, src.matches("sb[e] =").count() as u32);
            if fours {
                assert_eq!((sa, sb), ((2 * c.bm()).div_ceil(c.threads()), (2 * c.bn()).div_ceil(c.threads())), "{src}");
            }
        }
    }

    #[test]
    fn lavapipe_variants_widen_and_load_four_values_where_the_layout_allows() {
        let lp = |m, n, k, ohw, a, b| GemmConfig::pick_lavapipe(m, n, a, b).for_problem(k, ohw, true);
        // A Linear 77 x 768 -> 1280: the 80-row tile with a quarter of the invocations, every operand
        // in groups of four, a bias per column read once per group of columns (per row: once per row).
        let c = lp(77, 1280, 768, 1280, ALayout::RowMajor, BLayout::Pointwise);
        assert_eq!((c.bm(), c.bn(), c.hm, c.hn, c.threads()), (80, 128, 4, 4, 40));
        assert!(c.c4 && c.a4 && c.b4);
        let src = c.wgsl();
        assert!(src.contains("a: array<vec4<f32>>") && src.contains("b: array<vec4<f32>>") && src.contains("c: array<vec4<f32>>"), "{src}");
        assert_eq!(src.matches("bias[").count(), 4 * (c.hn + c.hm) as usize, "{src}");
        assert_eq!(src.matches("if (p.bias == 2u) { bc").count(), c.hn as usize, "{src}");
        assert_eq!(src.matches("if (p.bias == 1u) { bv = bias[m]; }").count(), 4 * c.hm as usize, "{src}");
        // 16 x 16 sums per invocation, 64 vec4 stores.
        assert!(src.contains("var c63 =") && !src.contains("var c64 ="));
        assert_eq!(src.matches("c[o").count(), 64);
        // A 3x3 conv at 8 x 8: A in fours, the image (im2col) one value at a time.
        let c = lp(320, 64, 2880, 64, ALayout::RowMajor, BLayout::Conv { kh: 3, kw: 3, sh: 1, sw: 1, ph: 1, pw: 1 });
        assert!(c.c4 && c.a4 && !c.b4 && c.hm == 4 && c.hn == 4);
        // Odd sizes: nothing in fours, the variant as picked (8 x 8 per invocation, scalar stores).
        let c = lp(40, 30, 63, 5 * 6, ALayout::RowMajor, BLayout::Pointwise);
        assert!(!c.c4 && !c.a4 && !c.b4 && c.hm == 2 && c.hn == 2);
        // The flipped conv weight (input gradients) is read one value at a time.
        let c = lp(320, 64, 2880, 64, ALayout::ConvFlipped { kk: 9 }, BLayout::Conv { kh: 3, kw: 3, sh: 1, sw: 1, ph: 1, pw: 1 });
        assert!(!c.a4 && c.c4);
        // f16 operands (compiled twice as long there): fours, not widened.
        let f16 = Elems { a: Elem::F16, b: Elem::F16, bias: Elem::F16, c: Elem::F16 };
        let c = GemmConfig::pick_lavapipe(77, 1280, ALayout::RowMajor, BLayout::Pointwise).with(f16).for_problem(768, 1280, true);
        assert!(c.c4 && c.a4 && c.b4 && (c.hm, c.hn) == (2, 2));
        assert!(
            c.wgsl().contains("c: array<vec4<f16>>")
                && c.wgsl().contains("var v = c0 + (vec4<f32>(bv) + bc0);")
                && c.wgsl().contains("= vec4<f16>(v)"),
            "{}",
            c.wgsl()
        );
        // Other adapters: the same variant, stores in fours only.
        let g = GemmConfig::pick(77, 1280, ALayout::RowMajor, BLayout::Pointwise).for_problem(768, 1280, false);
        assert!(g.c4 && !g.a4 && !g.b4 && (g.hm, g.hn) == (2, 2));
        // Every widened variant keeps its tile.
        for v in VARIANTS {
            let (x, y, hm, hn) = GemmConfig::widened(v);
            assert_eq!((4 * hm * y, 4 * hn * x), (4 * v.2 * v.1, 4 * v.3 * v.0), "{v:?}");
        }
    }

    #[test]
    fn f16_operands_are_declared_and_converted_at_the_edges() {
        let f32s = GemmConfig::pick(64, 64, ALayout::RowMajor, BLayout::Pointwise);
        assert!(!f32s.wgsl().contains("f16"), "an f32 GEMM needs no shader-f16");
        let mixed = f32s.with(Elems { a: Elem::F16, b: Elem::F32, bias: Elem::F32, c: Elem::F16 });
        let src = mixed.wgsl();
        assert!(src.starts_with("enable f16;"), "{src}");
        assert!(src.contains("a: array<f16>") && src.contains("b: array<f32>") && src.contains("c: array<f16>"));
        // Loads of A widen to f32, the tiles and sums stay f32, the store narrows.
        assert!(
            src.contains("f32(a[am * p.k + ak])")
                && src.contains("array<vec4<f32>")
                && src.contains("var v = c0[0] + (bv + bc0);")
                && src.contains("= f16(v)")
        );
    }

    #[test]
    fn every_variant_takes_a_bias_and_a_residual_as_parameters() {
        // One pipeline with or without a bias and a residual: every variant binds `bias` (after `b`)
        // and `res` (after the bias, before `c`), reads the bias per row or per column as `p.bias`
        // says, and adds the residual only where `p.rm` is not 0, at `image * rimg + m * rm + pixel * rpix`.
        for (c4, elems) in [(false, Elems::F32), (true, Elems::F32), (true, Elems { a: Elem::F16, b: Elem::F16, bias: Elem::F16, c: Elem::F16 })] {
            let c = GemmConfig::pick(64, 64, ALayout::RowMajor, BLayout::Pointwise).with(elems).for_problem(64, if c4 { 64 } else { 63 }, false);
            let src = c.wgsl();
            let (res, out) =
                (src.find("var<storage, read_write> res:").expect("declared"), src.find("var<storage, read_write> c:").expect("declared"));
            assert!(src.find("bias:").is_some_and(|b| b < res) && res < out, "{src}");
            let stores = src.matches("c[o").count();
            assert_eq!(src.matches("if (p.rm != 0u)").count(), stores, "{src}");
            assert!(
                src.contains("res[rq0 + m * p.rm + 0u * p.rpix]") && src.contains("let rq0 = (q0 / p.ohw) * p.rimg + (q0 % p.ohw) * p.rpix;"),
                "{src}"
            );
            assert_eq!(src.contains("res[rq0 + m * p.rm + 3u * p.rpix]"), c4, "four columns per store read four values");
            assert!(src.contains("bias: u32 }") && src.contains("if (p.bias == 1u) { bv = ") && src.contains("if (p.bias == 2u) { bc0 = "), "{src}");
        }
        assert_eq!([Bias::None, Bias::Row, Bias::Col].map(Bias::mode), [0, 1, 2]);
        // A skip laid out as the output (NCHW, or a Linear's rows), one value per image and row, none.
        assert_eq!(Residual::Full.strides(320, 64), [320 * 64, 64, 1]);
        assert_eq!(Residual::PerImage.strides(320, 64), [320, 1, 0]);
        assert_eq!(Residual::None.strides(320, 64)[1], 0);
    }

    #[test]
    fn the_pick_fills_small_problems_and_wastes_little_on_large_ones() {
        let p = |m, n| {
            let c = GemmConfig::pick(m, n, ALayout::RowMajor, BLayout::Pointwise);
            (c.bm(), c.bn())
        };
        assert_eq!(p(1280, 4096 * 3), (128, 128));
        // 64 pixels: a 128-wide tile would be half padding.
        assert_eq!(p(1280, 64).1, 64);
        assert_eq!(p(64, 64), (64, 64));
        // The deepest level at 8 x 8 latents: one pixel, 1280 channels.
        assert_eq!(p(1280, 1), (128, 8));
        // A Linear over 4 tokens.
        assert_eq!(p(4, 1280), (8, 128));
        // CLIP's 77 text states (cross-attention k / v): 80-row tiles, not 128 (40% padding).
        assert_eq!(p(77, 1280), (80, 128));
        assert_eq!(GemmConfig::pick_lavapipe(77, 640, ALayout::RowMajor, BLayout::Pointwise).bm(), 80);
    }
}
