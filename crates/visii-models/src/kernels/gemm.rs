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
    /// Invocations along `p` (columns); the tile is `8 * wg_x` wide. 8 or 16.
    pub wg_x: u32,
    /// Invocations along `m` (rows); the tile is `8 * wg_y` high. 8 or 16.
    pub wg_y: u32,
    pub a: ALayout,
    pub b: BLayout,
    pub bias: Bias,
}

/// The step along `K`.
pub const BK: u32 = 8;

/// The workgroup shapes `(wg_x, wg_y)` compiled: square and half tiles for large problems, narrow
/// ones (8 to 32 columns) for the few pixels of the deepest UNet levels, flat ones (8 to 32 rows) for
/// Linear layers over a few tokens.
pub const VARIANTS: [(u32, u32); 10] = [(16, 16), (16, 8), (8, 16), (8, 8), (1, 16), (2, 16), (4, 16), (16, 1), (16, 2), (16, 4)];

impl GemmConfig {
    pub fn bm(&self) -> u32 {
        8 * self.wg_y
    }
    pub fn bn(&self) -> u32 {
        8 * self.wg_x
    }
    pub fn threads(&self) -> u32 {
        self.wg_x * self.wg_y
    }

    /// The tile for an `m x n` output: the one that wastes the least work on padding, the larger
    /// on a tie. (Small problems on a large GPU would want more workgroups: a split along K is
    /// not done yet.)
    pub fn pick(m: usize, n: usize, a: ALayout, b: BLayout, bias: Bias) -> Self {
        let cost = |wg_x: u32, wg_y: u32| {
            let (bm, bn) = (8 * wg_y as usize, 8 * wg_x as usize);
            let groups = m.div_ceil(bm) * n.div_ceil(bn);
            (groups * bm * bn, groups)
        };
        let mut best = (16, 16);
        for (x, y) in VARIANTS {
            let (work, groups) = cost(x, y);
            let (best_work, best_groups) = cost(best.0, best.1);
            // Least padded work (at 8 x 8 latents the deepest UNet levels have 1 to 4 pixels: a
            // 64-wide tile would compute 16 to 64 times what is needed); on a tie the larger tile
            // (earlier in VARIANTS: it reads each weight fewer times).
            let _ = (groups, best_groups);
            let better = work < best_work;
            if better {
                best = (x, y);
            }
        }
        GemmConfig { wg_x: best.0, wg_y: best.1, a, b, bias }
    }

    /// The binding index of `C` and of the parameters.
    fn out_binding(&self) -> u32 {
        if self.bias == Bias::None {
            2
        } else {
            3
        }
    }

    /// The WGSL source of this variant; entry point `main`.
    pub fn wgsl(&self) -> String {
        let (wg_x, wg_y, t) = (self.wg_x, self.wg_y, self.threads());
        let (bm, bn) = (self.bm(), self.bn());
        assert!(VARIANTS.contains(&(wg_x, wg_y)), "unsupported workgroup {wg_x} x {wg_y}");
        // Whether each invocation loads one fixed column of the B tile (else columns vary per pass).
        let fixed_col = t % bn == 0;
        let out = self.out_binding();
        let mut s = String::new();
        let w = &mut s;
        // Params: m, n, k, ohw (output pixels per image), ow, h, w, img (input values per image).
        // Every buffer is declared read_write: natively cubecl carves tensors out of shared buffers,
        // and one buffer bound read-only and read-write in the same dispatch is invalid.
        let _ = writeln!(w, "struct Params {{ m: u32, n: u32, k: u32, ohw: u32, ow: u32, h: u32, w: u32, img: u32 }}");
        let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> a: array<f32>;");
        let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> b: array<f32>;");
        if self.bias != Bias::None {
            let _ = writeln!(w, "@group(0) @binding(2) var<storage, read_write> bias: array<f32>;");
        }
        let _ = writeln!(w, "@group(0) @binding({out}) var<storage, read_write> c: array<f32>;");
        let _ = writeln!(w, "@group(0) @binding({}) var<uniform> p: Params;", out + 1);
        let _ = writeln!(w, "var<workgroup> sa: array<vec4<f32>, {}>;", BK * bm / 4);
        let _ = writeln!(w, "var<workgroup> sb: array<vec4<f32>, {}>;", BK * bn / 4);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let tx = t % {wg_x}u; let ty = t / {wg_x}u;");
        let _ = writeln!(w, "  let m0 = wid.y * {bm}u; let n0 = wid.x * {bn}u;");
        // The B loader's column (one output pixel) and its image coordinates: once, where every
        // pass loads the same column, else in each pass.
        let column = |w: &mut String, indent: &str| {
            let _ = writeln!(w, "{indent}let pc = n0 + bcol; let pvalid = pc < p.n;");
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
        // The A loader: two invocations per row, four consecutive k each.
        let _ = writeln!(w, "  let am = t / 2u; let aq = (t % 2u) * 4u;");
        for i in 0..16 {
            let _ = writeln!(w, "  var c{i} = vec4<f32>(0.0);");
        }
        let _ = writeln!(w, "  for (var k0 = 0u; k0 < p.k; k0 = k0 + {BK}u) {{");
        // A: BM rows x 8 k, (t / 2) rows per pass.
        for pass in 0..(2 * bm / t) {
            let _ = writeln!(w, "    {{ let m = am + {}u; let gm = m0 + m; let row = gm * p.k;", pass * (t / 2));
            for j in 0..4 {
                let load = match self.a {
                    ALayout::RowMajor => "a[row + gk]".to_string(),
                    ALayout::ConvFlipped { kk } => format!("a[(gk / {kk}u) * p.m * {kk}u + gm * {kk}u + {}u - gk % {kk}u]", kk - 1),
                };
                let _ = writeln!(w, "      {{ let kk = aq + {j}u; let gk = k0 + kk; var v = 0.0; if (gm < p.m && gk < p.k) {{ v = {load}; }}");
                let _ = writeln!(w, "        let f = kk * {bm}u + m; sa[f / 4u][f % 4u] = v; }}");
            }
            let _ = writeln!(w, "    }}");
        }
        // B: 8 k x BN columns, t / BN rows per pass.
        for pass in 0..(BK * bn / t) {
            if fixed_col {
                let _ = writeln!(w, "    {{ let kr = brow + {}u; let gk = k0 + kr; var v = 0.0;", pass * (t / bn));
            } else {
                let _ = writeln!(w, "    {{ let e = t + {}u; let kr = e / {bn}u; let bcol = e % {bn}u; let gk = k0 + kr; var v = 0.0;", pass * t);
                column(w, "      ");
            }
            match self.b {
                BLayout::Pointwise => {
                    let _ = writeln!(w, "      if (pvalid && gk < p.k) {{ v = b[xbase + gk * p.ohw + ppix]; }}");
                }
                BLayout::PointwiseT => {
                    let _ = writeln!(w, "      if (pvalid && gk < p.k) {{ v = b[ppix * p.k + gk]; }}");
                }
                BLayout::Conv { kh, kw, .. } => {
                    let kk = kh * kw;
                    let _ = writeln!(w, "      if (pvalid && gk < p.k) {{");
                    let _ = writeln!(w, "        let ci = gk / {kk}u; let r = gk % {kk}u; let iy = iy0 + i32(r / {kw}u); let ix = ix0 + i32(r % {kw}u);");
                    let _ = writeln!(w, "        if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {{ v = b[xbase + ci * hw + u32(iy) * p.w + u32(ix)]; }}");
                    let _ = writeln!(w, "      }}");
                }
            }
            let _ = writeln!(w, "      let f = kr * {bn}u + bcol; sb[f / 4u][f % 4u] = v; }}");
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        // The 8 x 8 block: rows ty*4+i and BM/2+ty*4+i, columns tx*4.. and BN/2+tx*4...
        for kk in 0..BK {
            let _ = writeln!(
                w,
                "    {{ let a0 = sa[{}u + ty]; let a1 = sa[{}u + ty]; let b0 = sb[{}u + tx]; let b1 = sb[{}u + tx];",
                kk * bm / 4,
                kk * bm / 4 + bm / 8,
                kk * bn / 4,
                kk * bn / 4 + bn / 8
            );
            for i in 0..8 {
                let a = ["a0.x", "a0.y", "a0.z", "a0.w", "a1.x", "a1.y", "a1.z", "a1.w"][i];
                let _ = writeln!(w, "      c{} = fma(vec4<f32>({a}), b0, c{}); c{} = fma(vec4<f32>({a}), b1, c{});", 2 * i, 2 * i, 2 * i + 1, 2 * i + 1);
            }
            let _ = writeln!(w, "    }}");
        }
        let _ = writeln!(w, "    workgroupBarrier();");
        let _ = writeln!(w, "  }}");
        // Store: per column its output offset (image * M * ohw + pixel), then every row.
        for j in 0..8 {
            let col = if j < 4 { format!("tx * 4u + {j}u") } else { format!("{}u + tx * 4u + {}u", bn / 2, j - 4) };
            let _ = writeln!(w, "  let q{j} = n0 + {col}; let o{j} = (q{j} / p.ohw) * p.m * p.ohw + q{j} % p.ohw;");
        }
        for i in 0..8 {
            let row = if i < 4 { format!("ty * 4u + {i}u") } else { format!("{}u + ty * 4u + {}u", bm / 2, i - 4) };
            let _ = writeln!(w, "  {{ let m = m0 + {row}; if (m < p.m) {{ let ro = m * p.ohw;");
            if self.bias == Bias::Row {
                let _ = writeln!(w, "    let bv = bias[m];");
            }
            for j in 0..8 {
                let reg = format!("c{}[{}]", 2 * i + j / 4, j % 4);
                let v = match self.bias {
                    Bias::None => reg,
                    Bias::Row => format!("{reg} + bv"),
                    Bias::Col => format!("{reg} + bias[q{j}]"),
                };
                let _ = writeln!(w, "    if (q{j} < p.n) {{ c[o{j} + ro] = {v}; }}");
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
        for (x, y) in VARIANTS {
            let c = GemmConfig { wg_x: x, wg_y: y, a: ALayout::RowMajor, b: BLayout::Conv { kh: 3, kw: 3, sh: 2, sw: 2, ph: 0, pw: 0 }, bias: Bias::Row };
            assert_eq!((2 * c.bm() / c.threads()) * (c.threads() / 2), c.bm(), "A passes cover the rows");
            assert_eq!((BK * c.bn() / c.threads()) * c.threads(), BK * c.bn(), "B passes cover the tile");
            let src = c.wgsl();
            assert!(src.contains("@workgroup_size") && src.contains("bias[m]"));
        }
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
    }
}
