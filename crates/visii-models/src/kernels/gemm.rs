//! One tiled GEMM in plain WGSL (no subgroups, no cooperative matrices) that is also an implicit-GEMM
//! convolution: `C[m, p] = sum_k A[m, k] * B[k, p] (+ bias)`.
//!
//! - `A` is row-major `[M, K]`: a conv weight `[c_out, c_in, kh, kw]` as it is stored (no per-call
//!   layout copy), or a Linear's input rows.
//! - `B` is read straight from an NCHW image batch `[n, c_in, h, w]` as the im2col matrix
//!   (`k = (ci, ky, kx)`, `p = (image, oy, ox)`) without ever building it; for a pointwise (1x1,
//!   stride 1, no padding) conv it is the image itself, and a Linear's weight `[K, N]` is a
//!   one-image pointwise case (`c_in = K`, `h * w = N`).
//! - `C` is written NCHW `[n, c_out, oh, ow]` (a Linear: `[M, N]`), bias per row (conv) or per
//!   column (Linear).
//!
//! Each workgroup of `wg_x * wg_y` invocations computes a `BM x BN = 8 wg_y x 8 wg_x` tile of `C`,
//! every invocation an 8 x 8 block held as 16 `vec4` registers (two 4-row by two 4-column halves, so
//! its workgroup-memory reads are `vec4`s of consecutive rows / columns). `K` advances in steps of
//! 8: the `A` tile is staged transposed (`[k][m]`) and the `B` tile as `[k][p]` in workgroup memory.
//! The shape of the design (128 x 128 tiles, 8 x 8 per invocation, transposed `A`) is the one that
//! measured 30 TFLOP/s of f32 through Dawn on an H200 (issue 19); sizes, strides, padding and the
//! kernel geometry are parameters, so every conv and Linear of the models runs on it.
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

/// Which axis of `C` the bias runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bias {
    None,
    /// One value per row `m` (a conv's output channel).
    Row,
    /// One value per column `p` (a Linear's output feature).
    Col,
}

/// A compiled variant of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// Invocations along `p` (columns).
    pub wg_x: u32,
    /// Invocations along `m` (rows).
    pub wg_y: u32,
    /// Output rows per invocation in groups of 4 (1 or 2): the tile is `4 * hm * wg_y` high.
    pub hm: u32,
    /// Output columns per invocation in groups of 4 (1 or 2): the tile is `4 * hn * wg_x` wide.
    pub hn: u32,
    pub a: ALayout,
    pub b: BLayout,
    pub bias: Bias,
    /// The operands' element types (f32, or f16 for f16 activations; see [`Elem`]).
    pub elems: Elems,
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
    pub fn pick_from(variants: &[(u32, u32, u32, u32)], m: usize, n: usize, a: ALayout, b: BLayout, bias: Bias) -> Self {
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
        GemmConfig { wg_x, wg_y, hm, hn, a, b, bias, elems: Elems::F32 }
    }

    /// The tile for lavapipe: the least padded work over the rate a workgroup of that many
    /// invocations reaches there (measured, Linear 77 x 768 -> 1280 and 640 -> 5120 over 16 rows,
    /// 3x3 conv 320 -> 320 at 8 x 8: 16 invocations ~3.0 GFLOP/s of padded work, 32 ~4.6, 64 ~6.5,
    /// 128 ~7.8, 256 ~9.0: each invocation is a SIMD lane and a workgroup runs on one core, so a small
    /// one pays its per-step overhead on few lanes).
    pub fn pick_lavapipe(m: usize, n: usize, a: ALayout, b: BLayout, bias: Bias) -> Self {
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
        GemmConfig { wg_x, wg_y, hm, hn, a, b, bias, elems: Elems::F32 }
    }

    /// This variant with the operands' element types `elems`.
    pub fn with(self, elems: Elems) -> Self {
        GemmConfig { elems, ..self }
    }

    /// [`Self::pick_from`] the GPU variants.
    pub fn pick(m: usize, n: usize, a: ALayout, b: BLayout, bias: Bias) -> Self {
        Self::pick_from(&VARIANTS, m, n, a, b, bias)
    }

    /// The WGSL source of this variant; entry point `main`.
    pub fn wgsl(&self) -> String {
        let (wg_x, wg_y, t, hm, hn) = (self.wg_x, self.wg_y, self.threads(), self.hm, self.hn);
        let (bm, bn) = (self.bm(), self.bn());
        let shape = (wg_x, wg_y, hm, hn);
        assert!(VARIANTS.contains(&shape) || CPU_VARIANTS.contains(&shape), "unsupported GEMM variant {shape:?}");
        // Whether each invocation loads one fixed column of the B tile (else columns vary per pass).
        let fixed_col = t % bn == 0;
        let mut s = String::new();
        let w = &mut s;
        // Params: m, n, k, ohw (output pixels per image), ow, h, w, img (input values per image).
        // Every buffer is declared read_write: natively cubecl carves tensors out of shared buffers,
        // and one buffer bound read-only and read-write in the same dispatch is invalid.
        // Values are read into f32 (the tiles and sums are f32) and written in `c`'s type.
        let e = self.elems;
        let bias_elem = if self.bias == Bias::None { Elem::F32 } else { e.bias };
        Elem::enable(w, &[e.a, e.b, bias_elem, e.c]);
        let _ = writeln!(w, "struct Params {{ m: u32, n: u32, k: u32, ohw: u32, ow: u32, h: u32, w: u32, img: u32 }}");
        // Bindings in order: a (and its scales), b (and its scales), bias, c, the parameters.
        let mut next = 0;
        e.a.declare(w, "a", &mut next);
        e.b.declare(w, "b", &mut next);
        if self.bias != Bias::None {
            e.bias.declare(w, "bias", &mut next);
        }
        e.c.declare(w, "c", &mut next);
        let _ = writeln!(w, "@group(0) @binding({next}) var<uniform> p: Params;");
        let _ = writeln!(w, "var<workgroup> sa: array<vec4<f32>, {}>;", BK * bm / 4);
        let _ = writeln!(w, "var<workgroup> sb: array<vec4<f32>, {}>;", BK * bn / 4);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let tx = t % {wg_x}u; let ty = t / {wg_x}u;");
        let _ = writeln!(w, "  let m0 = wid.y * {bm}u; let n0 = wid.x * {bn}u;");
        // The B loader's column (one output pixel) and its image coordinates: once, where every
        // pass loads the same column, else in each pass.
        let column = |w: &mut String, indent: &str| {
            // Past the last column: load the last one (valid memory), zeroed by `pvalid`.
            let _ = writeln!(w, "{indent}let pvalid = n0 + bcol < p.n; let pc = min(n0 + bcol, p.n - 1u);");
            let _ = writeln!(w, "{indent}let pimg = pc / p.ohw; let ppix = pc % p.ohw; let xbase = pimg * p.img;");
            if let BLayout::Conv { sh, sw, ph, pw, .. } = self.b {
                let _ = writeln!(w, "{indent}let iy0 = i32((ppix / p.ow) * {sh}u) - {ph}; let ix0 = i32((ppix % p.ow) * {sw}u) - {pw};");
            }
        };
        let _ = writeln!(w, "  let hw = p.h * p.w;");
        if fixed_col {
            let _ = writeln!(w, "  let bcol = t % {bn}u; let brow = t / {bn}u;");
            column(w, "  ");
        }
        for i in 0..4 * hm * hn {
            let _ = writeln!(w, "  var c{i} = vec4<f32>(0.0);");
        }
        let _ = writeln!(w, "  for (var k0 = 0u; k0 < p.k; k0 = k0 + {BK}u) {{");
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
            let _ =
                writeln!(w, "    {{ let e = t + {}u; {guard}{{ let m = e / {BK}u; let kk = e % {BK}u; let gm = m0 + m; let gk = k0 + kk;", pass * t);
            let _ =
                writeln!(w, "      let am = min(gm, p.m - 1u); let ak = min(gk, p.k - 1u); let v = select(0.0, {load}, (gm < p.m) & (gk < p.k));");
            let _ = writeln!(w, "      let f = kk * {bm}u + m; sa[f / 4u][f % 4u] = v; }} }}");
        }
        // B: 8 k x BN columns.
        let b_elems = BK * bn;
        for pass in 0..b_elems.div_ceil(t) {
            let guard = if (pass + 1) * t > b_elems { format!("if (t + {}u < {b_elems}u) ", pass * t) } else { String::new() };
            if fixed_col {
                let _ = writeln!(w, "    {guard}{{ let kr = brow + {}u; let gk = k0 + kr; let bk = min(gk, p.k - 1u); var v = 0.0;", pass * (t / bn));
            } else {
                let _ =
                    writeln!(w, "    {guard}{{ let e = t + {}u; let kr = e / {bn}u; let bcol = e % {bn}u; let gk = k0 + kr; let bk = min(gk, p.k - 1u); var v = 0.0;", pass * t);
                column(w, "      ");
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
                    let _ =
                        writeln!(w, "      let ci = bk / {kk}u; let r = bk % {kk}u; let iy = iy0 + i32(r / {kw}u); let ix = ix0 + i32(r % {kw}u);");
                    let _ = writeln!(w, "      v = {};", super::image_value(e.b, "b", "xbase + ci * hw", "iy", "ix", "pvalid & (gk < p.k) & "));
                }
            }
            let _ = writeln!(w, "      let f = kr * {bn}u + bcol; sb[f / 4u][f % 4u] = v; }}");
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        // The block: rows ty*4+i (and BM/2+ty*4+i), columns tx*4.. (and BN/2+tx*4..).
        let rows = ["a0.x", "a0.y", "a0.z", "a0.w", "a1.x", "a1.y", "a1.z", "a1.w"];
        for kk in 0..BK {
            let _ = write!(w, "    {{ let a0 = sa[{}u + ty]; let b0 = sb[{}u + tx];", kk * bm / 4, kk * bn / 4);
            if hm == 2 {
                let _ = write!(w, " let a1 = sa[{}u + ty];", kk * bm / 4 + bm / 8);
            }
            if hn == 2 {
                let _ = write!(w, " let b1 = sb[{}u + tx];", kk * bn / 4 + bn / 8);
            }
            let _ = writeln!(w);
            for (i, a) in rows.iter().enumerate().take(4 * hm as usize) {
                for h in 0..hn as usize {
                    let r = i * hn as usize + h;
                    let _ = write!(w, " c{r} = fma(vec4<f32>({a}), b{h}, c{r});");
                }
            }
            let _ = writeln!(w, " }}");
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        let _ = writeln!(w, "  }}");
        // Store: per column its output offset (image * M * ohw + pixel), then every row.
        for j in 0..4 * hn {
            let col = if j < 4 { format!("tx * 4u + {j}u") } else { format!("{}u + tx * 4u + {}u", bn / 2, j - 4) };
            let _ = writeln!(w, "  let q{j} = n0 + {col}; let o{j} = (q{j} / p.ohw) * p.m * p.ohw + q{j} % p.ohw;");
        }
        for i in 0..4 * hm {
            let row = if i < 4 { format!("ty * 4u + {i}u") } else { format!("{}u + ty * 4u + {}u", bm / 2, i - 4) };
            let _ = writeln!(w, "  {{ let m = m0 + {row}; if (m < p.m) {{ let ro = m * p.ohw;");
            if self.bias == Bias::Row {
                let _ = writeln!(w, "    let bv = {};", e.bias.read("bias", "m"));
            }
            for j in 0..4 * hn {
                let reg = format!("c{}[{}]", i * hn + j / 4, j % 4);
                let v = match self.bias {
                    Bias::None => reg,
                    Bias::Row => format!("{reg} + bv"),
                    Bias::Col => format!("{reg} + {}", e.bias.read("bias", &format!("q{j}"))),
                };
                let _ = writeln!(w, "    if (q{j} < p.n) {{ c[o{j} + ro] = {}; }}", e.c.store(&v));
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
        for (wg_x, wg_y, hm, hn) in VARIANTS.into_iter().chain(CPU_VARIANTS) {
            let c = GemmConfig {
                wg_x,
                wg_y,
                hm,
                hn,
                a: ALayout::RowMajor,
                b: BLayout::Conv { kh: 3, kw: 3, sh: 2, sw: 2, ph: 0, pw: 0 },
                bias: Bias::Row,
                elems: Elems::F32,
            };
            assert!(c.bm() % 4 == 0 && c.bn() % 4 == 0 && c.bm() / 4 / hm == wg_y && c.bn() / 4 / hn == wg_x);
            let src = c.wgsl();
            assert!(src.contains("@workgroup_size") && src.contains("bias[m]"));
        }
    }

    #[test]
    fn f16_operands_are_declared_and_converted_at_the_edges() {
        let f32s = GemmConfig::pick(64, 64, ALayout::RowMajor, BLayout::Pointwise, Bias::Col);
        assert!(!f32s.wgsl().contains("f16"), "an f32 GEMM needs no shader-f16");
        let mixed = f32s.with(Elems { a: Elem::F16, b: Elem::F32, bias: Elem::F32, c: Elem::F16 });
        let src = mixed.wgsl();
        assert!(src.starts_with("enable f16;"), "{src}");
        assert!(src.contains("a: array<f16>") && src.contains("b: array<f32>") && src.contains("c: array<f16>"));
        // Loads of A widen to f32, the tiles and sums stay f32, the store narrows.
        assert!(src.contains("f32(a[am * p.k + ak])") && src.contains("array<vec4<f32>") && src.contains("= f16(c0[0]"));
    }

    #[test]
    fn the_pick_fills_small_problems_and_wastes_little_on_large_ones() {
        let p = |m, n| {
            let c = GemmConfig::pick(m, n, ALayout::RowMajor, BLayout::Pointwise, Bias::None);
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
        assert_eq!(GemmConfig::pick_lavapipe(77, 640, ALayout::RowMajor, BLayout::Pointwise, Bias::None).bm(), 80);
    }
}
