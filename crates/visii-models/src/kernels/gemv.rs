//! The skinny side of the GEMM: `C[m, q] = sum_k A[m, k] * B[k, q] (+ bias[m])` where `C` has at
//! most 16 columns `q`, in plain WGSL (no subgroups, no cooperative matrices).
//!
//! Where it runs: the deepest UNet levels (a conv over 1 to 16 pixels: `m` output channels, `q`
//! pixels) and Linear layers over 1 to 16 tokens (there `m` is the output feature and `q` the token:
//! `Cᵀ = Wᵀ Xᵀ`). The tiled GEMM (`gemm.rs`) wastes most of its tile there (an 8-column tile for one
//! pixel computes eight times what is needed) and has a handful of workgroups for a whole GPU; here
//! a workgroup owns `R` output rows and its 64 invocations split `K` among them, each keeping
//! `R x P` partial sums in registers, added as a tree in workgroup memory at the end. Every weight
//! value is read once, as the work is bound by reading the weights.
//!
//! A conv over a few pixels skips the kernel taps that reach no input pixel of any output pixel
//! (over one pixel with padding 1 a 3x3 conv only ever multiplies its centre tap: 1/9 of `K`); the
//! range of taps is part of the compiled variant. Taps in the range that fall outside the image for
//! one pixel read zeros, as in the tiled GEMM.
//!
//! Layouts:
//! - `A`: row-major `[M, K]` (a conv weight as stored, `K = c_in * kh * kw`; a Linear's weight
//!   `[K_in, N]` for the input gradient), or transposed: `A[m, k] = W[k, m]` with `W` `[K, M]` (a
//!   Linear's weight `[K, N]` for its forward).
//! - `B`: the im2col view of an NCHW batch (a conv; pointwise is the `1 x 1` case), or rows:
//!   `B[k, q] = X[q, k]` with `X` `[P, K]` (a Linear's input rows).
//! - `C`: NCHW `[n, M, oh, ow]` (`q = (image, pixel)`); for rows, `ohw = 1`, so `C` is `[P, M]`.

use super::gemm::Bias;
use super::{Elem, Elems};
use std::fmt::Write;

/// Invocations per workgroup (split along `K`).
pub const THREADS: u32 = 64;

/// The most columns of `C` this kernel takes.
pub const MAX_COLS: usize = 16;

/// How `A` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkinnyA {
    /// `A[m, k] = a[m * K + k]`.
    RowMajor,
    /// `A[m, k] = a[k * M + m]`.
    Transposed,
}

/// How `B` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkinnyB {
    /// The im2col view of an NCHW batch for a `kh x kw` kernel with these strides and top / left
    /// padding; only the taps `ky0 .. ky0 + nky`, `kx0 .. kx0 + nkx` are visited (the others reach
    /// no input pixel of any output pixel).
    Conv { kh: u32, kw: u32, sh: u32, sw: u32, ph: u32, pw: u32, ky0: u32, nky: u32, kx0: u32, nkx: u32 },
    /// `B[k, q] = b[q * K + k]`.
    Rows,
}

/// A compiled variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SkinnyConfig {
    /// Columns of `C` handled (a power of two, at least the real count).
    pub cols: u32,
    /// Rows of `C` per workgroup.
    pub rows: u32,
    pub a: SkinnyA,
    pub b: SkinnyB,
    pub bias: Bias,
    /// The operands' element types (see [`Elem`]).
    pub elems: Elems,
}

impl SkinnyConfig {
    /// The variant for `n` columns (`1..=MAX_COLS`): columns rounded up to a power of two, rows per
    /// workgroup so that each invocation keeps at most 32 partial sums.
    pub fn new(n: usize, a: SkinnyA, b: SkinnyB, bias: Bias) -> Self {
        assert!((1..=MAX_COLS).contains(&n), "the skinny GEMM takes 1 to {MAX_COLS} columns, not {n}");
        let cols = n.next_power_of_two() as u32;
        let rows = (32 / cols).clamp(2, 8);
        SkinnyConfig { cols, rows, a, b, bias, elems: Elems::F32 }
    }

    /// This variant with the operands' element types `elems`.
    pub fn with(self, elems: Elems) -> Self {
        SkinnyConfig { elems, ..self }
    }

    pub fn threads(&self) -> u32 {
        THREADS
    }

    /// The number of `K` steps the invocations share: `c_in * (visited taps)` for a conv, `K` for
    /// rows.
    pub fn steps(&self, k: usize) -> usize {
        match self.b {
            SkinnyB::Conv { kh, kw, nky, nkx, .. } => k / (kh * kw) as usize * (nky * nkx) as usize,
            SkinnyB::Rows => k,
        }
    }

    /// Rows of `C` per workgroup: one per invocation where `A` is transposed (see [`Self::wgsl`]).
    pub fn rows_per_group(&self) -> u32 {
        match self.a {
            SkinnyA::RowMajor => self.rows,
            SkinnyA::Transposed => THREADS,
        }
    }

    /// The WGSL source; entry point `main`. Params: `m, n, k, steps, ohw, ow, h, w, img, gx`.
    ///
    /// With `A` transposed (a Linear's weight `[K, M]`, its rows of `M` consecutive values), each
    /// invocation owns one row `m` of `C` and walks all of `K`: neighbouring invocations read
    /// neighbouring weights (one vector load on a CPU adapter, a coalesced read on a GPU) and the
    /// few input values are the same for all of them. Otherwise the invocations split `K`, as above.
    pub fn wgsl(&self) -> String {
        if self.a == SkinnyA::Transposed {
            return self.wgsl_columns();
        }
        let (cols, rows, t) = (self.cols, self.rows, THREADS);
        let parts = cols * rows;
        let mut s = String::new();
        let w = &mut s;
        self.header(w);
        let _ = writeln!(w, "var<workgroup> red: array<f32, {}>;", parts * t);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let m0 = (wid.y * p.gx + wid.x) * {rows}u;");
        // Rows past M read the last row (valid memory; their sums are never written).
        for r in 0..rows {
            let _ = writeln!(w, "  let row{r} = min(m0 + {r}u, p.m - 1u);");
        }
        // Each column's place in the input.
        match self.b {
            SkinnyB::Conv { sh, sw, ph, pw, .. } => {
                let _ = writeln!(w, "  let hw = p.h * p.w;");
                for q in 0..cols {
                    let _ = writeln!(
                        w,
                        "  let ok{q} = {q}u < p.n; let xb{q} = ({q}u / p.ohw) * p.img; let px{q} = {q}u % p.ohw; \
                         let iy{q} = i32((px{q} / p.ow) * {sh}u) - {ph}; let ix{q} = i32((px{q} % p.ow) * {sw}u) - {pw};"
                    );
                }
            }
            SkinnyB::Rows => {
                for q in 0..cols {
                    let _ = writeln!(w, "  let ok{q} = {q}u < p.n; let xb{q} = min({q}u, p.n - 1u) * p.k;");
                }
            }
        }
        for i in 0..parts {
            let _ = writeln!(w, "  var s{i} = 0.0;");
        }
        let _ = writeln!(w, "  for (var j = t; j < p.steps; j = j + {t}u) {{");
        // This step's k (and for a conv its channel and tap).
        match self.b {
            SkinnyB::Conv { kh, kw, ky0, nky, kx0, nkx, .. } => {
                let (kk, nt) = (kh * kw, nky * nkx);
                let _ = writeln!(
                    w,
                    "    let ci = j / {nt}u; let tt = j % {nt}u; let ky = {ky0}u + tt / {nkx}u; let kx = {kx0}u + tt % {nkx}u; \
                     let k = ci * {kk}u + ky * {kw}u + kx; let cb = ci * hw;"
                );
            }
            SkinnyB::Rows => {
                let _ = writeln!(w, "    let k = j;");
            }
        }
        let e = self.elems;
        for r in 0..rows {
            let load = match self.a {
                SkinnyA::RowMajor => e.a.read("a", &format!("row{r} * p.k + k")),
                SkinnyA::Transposed => e.a.read("a", &format!("k * p.m + row{r}")),
            };
            let _ = writeln!(w, "    let a{r} = {load};");
        }
        for q in 0..cols {
            match self.b {
                SkinnyB::Conv { .. } => {
                    let _ = writeln!(
                        w,
                        "    var b{q} = 0.0; {{ let y = iy{q} + i32(ky); let x = ix{q} + i32(kx); \
                         if (ok{q} && y >= 0 && y < i32(p.h) && x >= 0 && x < i32(p.w)) {{ b{q} = {}; }} }}",
                        e.b.read("b", &format!("xb{q} + cb + u32(y) * p.w + u32(x)"))
                    );
                }
                SkinnyB::Rows => {
                    // Columns past n read the last row (their sums are never written).
                    let _ = writeln!(w, "    let b{q} = {};", e.b.read("b", &format!("xb{q} + k")));
                }
            }
        }
        for r in 0..rows {
            let _ = write!(w, "   ");
            for q in 0..cols {
                let i = r * cols + q;
                let _ = write!(w, " s{i} = fma(a{r}, b{q}, s{i});");
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w, "  }}");
        // Tree over the invocations: red[i * T + t] holds invocation t's sum i.
        for i in 0..parts {
            let _ = writeln!(w, "  red[{}u + t] = s{i};", i * t);
        }
        let mut half = t / 2;
        while half > 0 {
            let _ = writeln!(w, "  workgroupBarrier();");
            let _ = write!(w, "  if (t < {half}u) {{");
            for i in 0..parts {
                let _ = write!(w, " red[{o}u + t] = red[{o}u + t] + red[{o}u + t + {half}u];", o = i * t);
            }
            let _ = writeln!(w, " }}");
            half /= 2;
        }
        let _ = writeln!(w, "  workgroupBarrier();");
        let _ = writeln!(w, "  if (t < {parts}u) {{");
        let _ = writeln!(w, "    let r = t / {cols}u; let q = t % {cols}u; let m = m0 + r;");
        let _ = writeln!(w, "    if (m < p.m && q < p.n) {{");
        let bias = if self.bias == Bias::Row { format!(" + {}", e.bias.read("bias", "m")) } else { String::new() };
        let _ = writeln!(w, "      c[(q / p.ohw) * p.m * p.ohw + m * p.ohw + q % p.ohw] = {};", e.c.store(&format!("red[t * {t}u]{bias}")));
        let _ = writeln!(w, "    }}");
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        s
    }
}

impl SkinnyConfig {
    /// The parameters and bindings of both forms: `a`, `b`, (`bias`), `c`, `p`. Every buffer
    /// read_write, as in gemm.rs (cubecl may bind one buffer twice natively).
    fn header(&self, w: &mut String) {
        let e = self.elems;
        let bias_elem = if self.bias == Bias::None { Elem::F32 } else { e.bias };
        Elem::enable(w, &[e.a, e.b, bias_elem, e.c]);
        let _ = writeln!(
            w,
            "struct Params {{ m: u32, n: u32, k: u32, steps: u32, ohw: u32, ow: u32, h: u32, w: u32, img: u32, gx: u32, u0: u32, u1: u32 }}"
        );
        // Bindings in order: a (and its scales), b (and its scales), bias, c, the parameters.
        let mut next = 0;
        e.a.declare(w, "a", &mut next);
        e.b.declare(w, "b", &mut next);
        if self.bias != Bias::None {
            e.bias.declare(w, "bias", &mut next);
        }
        e.c.declare(w, "c", &mut next);
        let _ = writeln!(w, "@group(0) @binding({next}) var<uniform> p: Params;");
    }

    /// [`Self::wgsl`] for a transposed `A` with rows of `B` (a Linear over a few tokens).
    fn wgsl_columns(&self) -> String {
        assert!(self.b == SkinnyB::Rows, "a transposed A goes with rows of B");
        let (cols, t) = (self.cols, THREADS);
        let e = self.elems;
        let (la, lb) = (|i: &str| e.a.read("a", i), |i: &str| e.b.read("b", i));
        let mut s = String::new();
        let w = &mut s;
        self.header(w);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let m = (wid.y * p.gx + wid.x) * {t}u + t;");
        // Rows past M read the last row (valid memory) and write nothing; no early return, so the
        // control flow stays uniform.
        let _ = writeln!(w, "  let row = min(m, p.m - 1u);");
        for q in 0..cols {
            let _ = writeln!(w, "  let xb{q} = min({q}u, p.n - 1u) * p.k; var s{q} = 0.0;");
        }
        // K in steps of 4 (independent loads in flight), then the rest one at a time; each sum
        // still adds its products in k order.
        let _ = writeln!(w, "  let k4 = p.k / 4u * 4u; var k = 0u;");
        let _ = writeln!(w, "  for (; k < k4; k = k + 4u) {{");
        let _ = writeln!(w, "    let ao = k * p.m + row;");
        let _ = writeln!(
            w,
            "    let v0 = {}; let v1 = {}; let v2 = {}; let v3 = {};",
            la("ao"),
            la("ao + p.m"),
            la("ao + 2u * p.m"),
            la("ao + 3u * p.m")
        );
        for q in 0..cols {
            let _ = writeln!(
                w,
                "    {{ let o = xb{q} + k; s{q} = fma(v3, {}, fma(v2, {}, fma(v1, {}, fma(v0, {}, s{q})))); }}",
                lb("o + 3u"),
                lb("o + 2u"),
                lb("o + 1u"),
                lb("o")
            );
        }
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "  for (; k < p.k; k = k + 1u) {{");
        let _ = write!(w, "    let v = {};", la("k * p.m + row"));
        for q in 0..cols {
            let _ = write!(w, " s{q} = fma(v, {}, s{q});", lb(&format!("xb{q} + k")));
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "  if (m < p.m) {{");
        let bias = if self.bias == Bias::Row { format!(" + {}", e.bias.read("bias", "m")) } else { String::new() };
        for q in 0..cols {
            let _ = writeln!(w, "    if ({q}u < p.n) {{ c[{q}u * p.m + m] = {}; }}", e.c.store(&format!("s{q}{bias}")));
        }
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        s
    }
}

/// The taps of a `k`-long kernel axis (stride `s`, leading padding `pad`, input length `len`,
/// output length `out`) that reach an input value for some output position: `(first, count)`.
pub fn taps(k: usize, s: usize, pad: usize, len: usize, out: usize) -> (u32, u32) {
    let reaches = |t: usize| (0..out).any(|o| (o * s + t).checked_sub(pad).is_some_and(|i| i < len));
    let first = (0..k).find(|&t| reaches(t));
    let last = (0..k).rev().find(|&t| reaches(t));
    match (first, last) {
        (Some(f), Some(l)) => (f as u32, (l - f + 1) as u32),
        // No tap reaches the image (a conv of padding only): visit one; it reads zeros.
        _ => (0, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_over_one_pixel_are_the_centre() {
        // 3x3, pad 1, one pixel in and out: only the centre.
        assert_eq!(taps(3, 1, 1, 1, 1), (1, 1));
        // Two pixels: all three taps reach something.
        assert_eq!(taps(3, 1, 1, 2, 2), (0, 3));
        // Stride 2 from 2 to 1: taps 1 and 2.
        assert_eq!(taps(3, 2, 1, 2, 1), (1, 2));
        // 1x1 pointwise.
        assert_eq!(taps(1, 1, 0, 4, 4), (0, 1));
    }

    #[test]
    fn variants_keep_at_most_32_sums() {
        for n in 1..=MAX_COLS {
            let c = SkinnyConfig::new(n, SkinnyA::RowMajor, SkinnyB::Rows, Bias::Row);
            assert!(c.cols as usize >= n && c.cols * c.rows <= 32 && c.rows >= 2);
            assert!(c.wgsl().contains("@workgroup_size(64)"));
        }
    }
}
