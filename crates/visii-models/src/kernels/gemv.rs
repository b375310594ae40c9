//! The skinny side of the GEMM: `C[m, q] = sum_k A[m, k] * B[k, q] (+ bias[m]) (+ residual)` where
//! `C` has at most 16 columns `q`, in plain WGSL (no subgroups, no cooperative matrices); the bias
//! and the residual are launch parameters as in the tiled GEMM (`gemm::Bias`, `gemm::Residual`): only
//! a bias per row (`p.bias == 1`) is read here.
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

use super::{Elem, Elems};
use std::fmt::Write;

/// Invocations per workgroup (split along `K`, or rows of `C` where `A` is transposed) on a GPU;
/// CPU adapters take fewer ([`SkinnyConfig::with_threads`]).
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
    /// A conv weight `[c_out, c_in, kh, kw]` read as the weight of the transposed conv (the input
    /// gradient of a stride-1 conv, with a conv `B` of the output gradient): `A[ci, (co, r)] =
    /// W[co, ci, kk - 1 - r]` with `kk = kh * kw`, as the tiled GEMM's `ALayout::ConvFlipped`.
    ConvFlipped { kk: u32 },
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
    /// The operands' element types (see [`Elem`]).
    pub elems: Elems,
    /// Operands read four values at a time (see [`Self::vectorised`]).
    pub vec4: bool,
    /// With `A` transposed: the rows of `B` read four values at a time (`K` a multiple of 4).
    pub b4: bool,
    /// Invocations per workgroup (a power of two): [`THREADS`] unless [`Self::with_threads`].
    pub threads: u32,
}

impl SkinnyConfig {
    /// The variant for `n` columns (`1..=MAX_COLS`): columns rounded up to a power of two, rows per
    /// workgroup so that each invocation keeps at most 32 partial sums.
    pub fn new(n: usize, a: SkinnyA, b: SkinnyB) -> Self {
        assert!((1..=MAX_COLS).contains(&n), "the skinny GEMM takes 1 to {MAX_COLS} columns, not {n}");
        let cols = n.next_power_of_two() as u32;
        let rows = (32 / cols).clamp(2, 8);
        SkinnyConfig { cols, rows, a, b, elems: Elems::F32, vec4: false, b4: false, threads: THREADS }
    }

    /// This variant reading its operands four values at a time where it can (for `m` rows of `C` and
    /// `k` values along `K`; the types readable so, [`Elem::reads4`]):
    /// - `A` transposed, `m` a multiple of 4: each invocation owns four consecutive rows of `C`
    ///   and reads `A` as `vec4`s; the same products added in the same order (equal to the last bit).
    /// - `A` row-major, `k` a multiple of 4, every tap of a conv visited (or rows of `B`): each
    ///   invocation takes four consecutive `k` per step, `A` (and rows of `B`) read as `vec4`s; the
    ///   partial sums split `K` differently (equal within the summation-order tolerance).
    /// - `A` transposed, `k` a multiple of 4 ([`Self::b4`]): the four values of a row of `B` that a
    ///   step multiplies are one `vec4` read instead of four (on a CPU adapter each read is a load
    ///   per lane: four times fewer of them); the same products in the same order.
    pub fn vectorised(self, m: usize, k: usize) -> Self {
        let e = self.elems;
        let vec4 = match (self.a, self.b) {
            (SkinnyA::Transposed, _) => m.is_multiple_of(4) && e.a.reads4(),
            (SkinnyA::RowMajor, SkinnyB::Conv { kh, kw, nky, nkx, .. }) => k.is_multiple_of(4) && nky == kh && nkx == kw && e.a.reads4(),
            (SkinnyA::RowMajor, SkinnyB::Rows) => k.is_multiple_of(4) && e.a.reads4() && e.b.reads4(),
            // Consecutive k of a flipped weight run backwards: one at a time.
            (SkinnyA::ConvFlipped { .. }, _) => false,
        };
        let b4 = self.a == SkinnyA::Transposed && k.is_multiple_of(4) && e.b.reads4();
        SkinnyConfig { vec4, b4, ..self }
    }

    /// This variant with the operands' element types `elems`.
    pub fn with(self, elems: Elems) -> Self {
        SkinnyConfig { elems, ..self }
    }

    /// `var {name} = ..;`: the bias of a row (`reads`: one value) or of four (a `vec4`), 0 where
    /// the launch has none (`p.bias == 0`: a uniform branch; a sum plus 0 is the sum).
    fn row_bias(name: &str, reads: &[String]) -> String {
        let (zero, value) = match reads {
            [one] => ("0.0".to_string(), one.clone()),
            _ => (format!("vec{}<f32>(0.0)", reads.len()), format!("vec{}<f32>({})", reads.len(), reads.join(", "))),
        };
        format!("var {name} = {zero}; if (p.bias != 0u) {{ {name} = {value}; }}")
    }

    /// The store of `v` (an f32 expression) to `c[at]` for row `m`, column `q`, with the residual
    /// added where there is one (a uniform branch on `p.rm`; strides as in the tiled GEMM's
    /// `gemm::Residual`).
    fn store_with_residual(&self, at: &str, m: &str, q: &str, v: &str) -> String {
        let e = self.elems;
        let res = e.c.read("res", &format!("(({q}) / p.ohw) * p.rimg + ({m}) * p.rm + (({q}) % p.ohw) * p.rpix"));
        format!("{{ var v = {v}; if (p.rm != 0u) {{ v = v + {res}; }} c[{at}] = {}; }}", e.c.store("v"))
    }

    /// This variant with `threads` invocations per workgroup (a power of two, 1 to 256). Each
    /// invocation's work is the same whatever the count (its rows where `A` is transposed, so the
    /// values are the same to the last bit); where the invocations split `K` the partial sums split
    /// it differently (equal within the summation-order tolerance).
    pub fn with_threads(self, threads: u32) -> Self {
        assert!(threads.is_power_of_two() && threads <= 256, "{threads} invocations per workgroup");
        SkinnyConfig { threads, ..self }
    }

    pub fn threads(&self) -> u32 {
        self.threads
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
            SkinnyA::RowMajor | SkinnyA::ConvFlipped { .. } => self.rows,
            SkinnyA::Transposed if self.vec4 => 4 * self.threads,
            SkinnyA::Transposed => self.threads,
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
        let (cols, rows, t) = (self.cols, self.rows, self.threads);
        let parts = cols * rows;
        let v4 = self.vec4;
        let b4 = v4 && self.b == SkinnyB::Rows;
        let mut s = String::new();
        let w = &mut s;
        self.header(w, v4, b4);
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
                        "  let col{q} = min({q}u, p.n - 1u); let xb{q} = (col{q} / p.ohw) * p.img; let px{q} = col{q} % p.ohw; \
                         let iy{q} = i32((px{q} / p.ow) * {sh}u) - {ph}; let ix{q} = i32((px{q} % p.ow) * {sw}u) - {pw};"
                    );
                }
            }
            SkinnyB::Rows => {
                for q in 0..cols {
                    let _ = writeln!(w, "  let xb{q} = min({q}u, p.n - 1u) * p.k;");
                }
            }
        }
        for i in 0..parts {
            let _ = writeln!(w, "  var s{i} = 0.0;");
        }
        let e = self.elems;
        if v4 {
            self.steps4(w);
        } else {
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
            for r in 0..rows {
                let idx = match (self.a, self.b) {
                    // W[ci, row, kk - 1 - (ky kw + kx)]: `ci` is the gradient's channel (a c_out).
                    (SkinnyA::ConvFlipped { kk }, SkinnyB::Conv { kh, kw, .. }) => {
                        assert_eq!(kk, kh * kw, "a flipped weight of {kk} taps with a {kh}x{kw} conv");
                        format!("ci * p.m * {kk}u + row{r} * {kk}u + {}u - ky * {kw}u - kx", kk - 1)
                    }
                    (SkinnyA::ConvFlipped { .. }, SkinnyB::Rows) => unreachable!("a flipped conv weight goes with a conv B"),
                    _ => format!("row{r} * p.k + k"),
                };
                let _ = writeln!(w, "    let a{r} = {};", e.a.read("a", &idx));
            }
            for q in 0..cols {
                let load = match self.b {
                    SkinnyB::Conv { .. } => self.load_tap(&format!("b{q}"), q, "ky", "kx", "cb"),
                    // Columns past n read the last row (their sums are never written).
                    SkinnyB::Rows => format!("let b{q} = {};", e.b.read("b", &format!("xb{q} + k"))),
                };
                let _ = writeln!(w, "    {load}");
            }
            for r in 0..rows {
                let _ = write!(w, "   ");
                for q in 0..cols {
                    let i = r * cols + q;
                    let _ = write!(w, " s{i} = fma(a{r}, b{q}, s{i});");
                }
                let _ = writeln!(w);
            }
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
        // Sum i = (row r, column q) is written by invocation i (or, with fewer invocations than
        // sums, i % T in turn).
        if t >= parts {
            let _ = writeln!(w, "  if (t < {parts}u) {{ let i = t;");
        } else {
            let _ = writeln!(w, "  for (var i = t; i < {parts}u; i = i + {t}u) {{");
        }
        let _ = writeln!(w, "    let r = i / {cols}u; let q = i % {cols}u; let m = m0 + r;");
        let _ = writeln!(w, "    if (m < p.m && q < p.n) {{");
        let _ = writeln!(w, "      {}", Self::row_bias("bv", &[e.bias.read("bias", "m")]));
        let _ = writeln!(w, "      let at = (q / p.ohw) * p.m * p.ohw + m * p.ohw + q % p.ohw;");
        let _ = writeln!(w, "      {}", self.store_with_residual("at", "m", "q", &format!("red[i * {t}u] + bv")));
        let _ = writeln!(w, "    }}");
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        s
    }
}

impl SkinnyConfig {
    /// The parameters and bindings of both forms: `a`, `b`, `bias`, `res`, `c`, `p`. Every buffer
    /// read_write, as in gemm.rs (cubecl may bind one buffer twice natively); `a` (`b`) declared
    /// in groups of four values where `a4` (`b4`).
    fn header(&self, w: &mut String, a4: bool, b4: bool) {
        let e = self.elems;
        Elem::enable(w, &[e.a, e.b, e.bias, e.c]);
        let _ = writeln!(
            w,
            "struct Params {{ m: u32, n: u32, k: u32, steps: u32, ohw: u32, ow: u32, h: u32, w: u32, img: u32, gx: u32, rimg: u32, rm: u32, rpix: u32, bias: u32 }}"
        );
        // Bindings in order: a (and its scales), b (and its scales), bias, residual, c, the parameters.
        let mut next = 0;
        if a4 {
            e.a.declare4(w, "a", &mut next);
        } else {
            e.a.declare(w, "a", &mut next);
        }
        if b4 {
            e.b.declare4(w, "b", &mut next);
        } else {
            e.b.declare(w, "b", &mut next);
        }
        // The bias (a placeholder buffer where there is none: `p.bias == 0`) and the residual (one
        // where there is none: `p.rm == 0`).
        e.bias.declare(w, "bias", &mut next);
        e.c.declare(w, "res", &mut next);
        e.c.declare(w, "c", &mut next);
        let _ = writeln!(w, "@group(0) @binding({next}) var<uniform> p: Params;");
    }

    /// [`Self::wgsl`] for a transposed `A` with rows of `B` (a Linear over a few tokens). Each
    /// invocation owns one row of `C`, or with [`Self::vec4`] four neighbouring ones: `A`'s row `k` is
    /// then read as `vec4`s (`M / 4` of them) and each sum is a `vec4` of the four rows' sums, the
    /// same products added in the same order as one row at a time (equal to the last bit), with a
    /// quarter of the loads of `A` (on a CPU adapter every load is a loop over the lanes; on a GPU a
    /// 16-byte read).
    fn wgsl_columns(&self) -> String {
        assert!(self.b == SkinnyB::Rows, "a transposed A goes with rows of B");
        let (cols, t, v4) = (self.cols, self.threads, self.vec4);
        let e = self.elems;
        let la = |i: &str| if v4 { e.a.read4("a", i) } else { e.a.read("a", i) };
        // A value of B as a term of the sums (a vec4 of it for four rows).
        let splat = |v: String| if v4 { format!("vec4<f32>({v})") } else { v };
        let lb = |i: &str| splat(e.b.read("b", i));
        // With four rows per invocation, `g` is its group (rows 4g .. 4g + 3 of C), `m4` groups per
        // row of A.
        let (stride, zero) = if v4 { ("m4", "vec4<f32>(0.0)") } else { ("p.m", "0.0") };
        let mut s = String::new();
        let w = &mut s;
        self.header(w, v4, self.b4);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        if v4 {
            let _ = writeln!(w, "  let m4 = p.m / 4u; let g = (wid.y * p.gx + wid.x) * {t}u + t;");
        } else {
            let _ = writeln!(w, "  let m = (wid.y * p.gx + wid.x) * {t}u + t;");
        }
        // Rows past M read the last row (valid memory) and write nothing; no early return, so the
        // control flow stays uniform.
        if v4 {
            let _ = writeln!(w, "  let row = min(g, m4 - 1u);");
        } else {
            let _ = writeln!(w, "  let row = min(m, p.m - 1u);");
        }
        for q in 0..cols {
            let _ = writeln!(w, "  let xb{q} = min({q}u, p.n - 1u) * p.k; var s{q} = {zero};");
        }
        // K in steps of 4 (independent loads in flight), then the rest one at a time; each sum
        // still adds its products in k order.
        let _ = writeln!(w, "  let k4 = p.k / 4u * 4u; var k = 0u;");
        let _ = writeln!(w, "  for (; k < k4; k = k + 4u) {{");
        let _ = writeln!(w, "    let ao = k * {stride} + row;");
        let (a1, a2, a3) = (format!("ao + {stride}"), format!("ao + 2u * {stride}"), format!("ao + 3u * {stride}"));
        let _ = writeln!(w, "    let v0 = {}; let v1 = {}; let v2 = {}; let v3 = {};", la("ao"), la(&a1), la(&a2), la(&a3));
        for q in 0..cols {
            let terms = if self.b4 {
                let _ = writeln!(w, "    let b{q} = {};", e.b.read4("b", &format!("(xb{q} + k) / 4u")));
                [0, 1, 2, 3].map(|i| splat(format!("b{q}[{i}]")))
            } else {
                let _ = writeln!(w, "    let o{q} = xb{q} + k;");
                [0, 1, 2, 3].map(|i| lb(&format!("o{q} + {i}u")))
            };
            let [t0, t1, t2, t3] = terms;
            let _ = writeln!(w, "    s{q} = fma(v3, {t3}, fma(v2, {t2}, fma(v1, {t1}, fma(v0, {t0}, s{q}))));");
        }
        let _ = writeln!(w, "  }}");
        // With b4, K is a multiple of 4 (no rest), and `b` holds groups of four.
        if !self.b4 {
            let _ = writeln!(w, "  for (; k < p.k; k = k + 1u) {{");
            let _ = write!(w, "    let v = {};", la(&format!("k * {stride} + row")));
            for q in 0..cols {
                let _ = write!(w, " s{q} = fma(v, {}, s{q});", lb(&format!("xb{q} + k")));
            }
            let _ = writeln!(w);
            let _ = writeln!(w, "  }}");
        }
        if v4 {
            let _ = writeln!(w, "  if (g < m4) {{");
            let _ = writeln!(w, "    let m = 4u * g;");
            let b = |i: &str| e.bias.read("bias", i);
            let _ = writeln!(w, "    {}", Self::row_bias("bv", &[b("m"), b("m + 1u"), b("m + 2u"), b("m + 3u")]));
            for q in 0..cols {
                let _ = writeln!(w, "    if ({q}u < p.n) {{ let sv = s{q} + bv;");
                for i in 0..4 {
                    let (at, row) = (format!("{q}u * p.m + m + {i}u"), format!("m + {i}u"));
                    let _ = writeln!(w, "      {}", self.store_with_residual(&at, &row, &format!("{q}u"), &format!("sv[{i}]")));
                }
                let _ = writeln!(w, "    }}");
            }
        } else {
            let _ = writeln!(w, "  if (m < p.m) {{");
            let _ = writeln!(w, "    {}", Self::row_bias("bv", &[e.bias.read("bias", "m")]));
            for q in 0..cols {
                let at = format!("{q}u * p.m + m");
                let _ = writeln!(w, "    if ({q}u < p.n) {}", self.store_with_residual(&at, "m", &format!("{q}u"), &format!("s{q} + bv")));
            }
        }
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        s
    }
}

impl SkinnyConfig {
    /// `let {name} = ..;`: column `q`'s value of a conv's `B` at tap `ky`, `kx` of the channel at
    /// offset `cb` (zero outside the image, without a branch: [`super::image_value`]).
    fn load_tap(&self, name: &str, q: u32, ky: &str, kx: &str, cb: &str) -> String {
        let (y, x) = (format!("{name}y"), format!("{name}x"));
        let value = super::image_value(self.elems.b, "b", &format!("xb{q} + {cb}"), &y, &x, "");
        format!("let {y} = iy{q} + i32({ky}); let {x} = ix{q} + i32({kx}); let {name} = {value};")
    }

    /// The main loop of the row-major form four `k` at a time (see [`Self::vectorised`]): step `j`
    /// covers `k = 4j .. 4j + 3`, `A`'s four values (and rows of `B`'s) one `vec4` read each.
    fn steps4(&self, w: &mut String) {
        let (cols, rows, t, e) = (self.cols, self.rows, self.threads, self.elems);
        let _ = writeln!(w, "  let k4 = p.k / 4u;");
        let _ = writeln!(w, "  for (var j = t; j < k4; j = j + {t}u) {{");
        for r in 0..rows {
            let _ = writeln!(w, "    let a{r} = {};", e.a.read4("a", &format!("row{r} * k4 + j")));
        }
        match self.b {
            SkinnyB::Conv { kh, kw, .. } => {
                // Every tap is visited, so k is the weight's own index: channel k / (kh kw).
                for i in 0..4 {
                    let _ = writeln!(
                        w,
                        "    let k{i} = 4u * j + {i}u; let ci{i} = k{i} / {kk}u; let tt{i} = k{i} % {kk}u; \
                         let ky{i} = tt{i} / {kw}u; let kx{i} = tt{i} % {kw}u; let cb{i} = ci{i} * hw;",
                        kk = kh * kw
                    );
                    for q in 0..cols {
                        let _ =
                            writeln!(w, "    {}", self.load_tap(&format!("b{q}_{i}"), q, &format!("ky{i}"), &format!("kx{i}"), &format!("cb{i}")));
                    }
                }
            }
            SkinnyB::Rows => {
                for q in 0..cols {
                    let _ = writeln!(w, "    let b{q} = {};", e.b.read4("b", &format!("xb{q} / 4u + j")));
                    for i in 0..4 {
                        let _ = writeln!(w, "    let b{q}_{i} = b{q}[{i}];");
                    }
                }
            }
        }
        for r in 0..rows {
            for q in 0..cols {
                let i = r * cols + q;
                let _ = writeln!(w, "    s{i} = fma(a{r}[3], b{q}_3, fma(a{r}[2], b{q}_2, fma(a{r}[1], b{q}_1, fma(a{r}[0], b{q}_0, s{i}))));");
            }
        }
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
    fn four_at_a_time_only_where_the_values_line_up() {
        let conv = |nky, nkx| SkinnyB::Conv { kh: 3, kw: 3, sh: 1, sw: 1, ph: 1, pw: 1, ky0: 0, nky, kx0: 0, nkx };
        let new = |a, b| SkinnyConfig::new(4, a, b);
        // Transposed A (a Linear's forward): M a multiple of 4.
        assert!(new(SkinnyA::Transposed, SkinnyB::Rows).vectorised(1280, 77).vec4);
        assert!(!new(SkinnyA::Transposed, SkinnyB::Rows).vectorised(77, 1280).vec4);
        // Row-major A: K a multiple of 4 and every tap visited (K is then the weight's own index).
        assert!(new(SkinnyA::RowMajor, conv(3, 3)).vectorised(1280, 11520).vec4);
        assert!(!new(SkinnyA::RowMajor, conv(3, 3)).vectorised(16, 27).vec4);
        assert!(!new(SkinnyA::RowMajor, conv(1, 1)).vectorised(1280, 11520).vec4);
        assert!(new(SkinnyA::RowMajor, SkinnyB::Rows).vectorised(96, 72).vec4);
        assert!(!new(SkinnyA::RowMajor, SkinnyB::Rows).vectorised(96, 70).vec4);
        // int8 weights in blocks of 4 or more read four at a time; their words hold four values.
        let q8 = Elems { a: Elem::Q8 { block: 8 }, ..Elems::F32 };
        let cfg = new(SkinnyA::Transposed, SkinnyB::Rows).with(q8).vectorised(1280, 77);
        assert!(cfg.vec4 && cfg.wgsl().contains("array<u32>") && cfg.wgsl().contains("a_s[(ao) * 4u / 8u]"));
        let f32 = new(SkinnyA::RowMajor, SkinnyB::Rows).vectorised(96, 72).wgsl();
        assert!(f32.contains("a: array<vec4<f32>>") && f32.contains("b: array<vec4<f32>>"));
    }

    #[test]
    fn conv_loads_have_no_branches() {
        // A branch per load (an `if`, or `&&`, which short-circuits) in the K loop made SwiftShader's
        // compiler grow by gigabytes and never finish (the 8-column variants; every vec4 one).
        for n in [1, 4, 8] {
            for (kh, nk) in [(3, 3), (3, 2), (1, 1)] {
                let b = SkinnyB::Conv { kh, kw: kh, sh: 1, sw: 1, ph: kh / 2, pw: kh / 2, ky0: 0, nky: nk, kx0: 0, nkx: nk };
                for k in [48 * kh as usize * kh as usize, 27] {
                    let src = SkinnyConfig::new(n, SkinnyA::RowMajor, b).vectorised(64, k).wgsl();
                    let main_loop = &src[src.find("for (var j").unwrap()..src.find("red[").unwrap()];
                    assert!(!main_loop.contains("&&") && !main_loop.contains("if ("), "{n} columns, {kh}x{kh}, K {k}");
                }
            }
        }
    }

    #[test]
    fn fewer_invocations_than_sums_write_every_sum() {
        // 4 columns x 8 rows = 32 sums per workgroup: with 8 invocations (lavapipe's) each writes
        // four in turn; with 64 (a GPU's) the first 32 write one each.
        let cfg = SkinnyConfig::new(4, SkinnyA::RowMajor, SkinnyB::Rows);
        let few = cfg.with_threads(8).wgsl();
        assert!(few.contains("@workgroup_size(8)") && few.contains("for (var i = t; i < 32u; i = i + 8u)") && few.contains("red[i * 8u]"));
        let many = cfg.wgsl();
        assert!(many.contains("@workgroup_size(64)") && many.contains("if (t < 32u) { let i = t;"));
        // Rows owned per invocation (A transposed): a workgroup of 4 covers 16 rows with vec4 reads.
        let cols = SkinnyConfig::new(4, SkinnyA::Transposed, SkinnyB::Rows).vectorised(1280, 1280).with_threads(4);
        assert_eq!(cols.rows_per_group(), 16);
        assert!(cols.b4 && cols.wgsl().contains("b: array<vec4<f32>>"));
        // K not a multiple of 4: B read by element, with the loop over the rest.
        let odd = SkinnyConfig::new(4, SkinnyA::Transposed, SkinnyB::Rows).vectorised(1280, 1278);
        assert!(!odd.b4 && odd.wgsl().contains("for (; k < p.k; k = k + 1u)"));
    }

    #[test]
    fn flipped_weights_are_read_tap_by_tap() {
        // The input gradient over one pixel: the centre tap of W[co, ci, 1, 1] (flipped: 8 - 4 = 4).
        let b = SkinnyB::Conv { kh: 3, kw: 3, sh: 1, sw: 1, ph: 1, pw: 1, ky0: 1, nky: 1, kx0: 1, nkx: 1 };
        let cfg = SkinnyConfig::new(1, SkinnyA::ConvFlipped { kk: 9 }, b).vectorised(1280, 11520);
        assert!(!cfg.vec4 && cfg.steps(11520) == 1280 && cfg.rows_per_group() == cfg.rows);
        assert!(cfg.wgsl().contains("a[ci * p.m * 9u + row0 * 9u + 8u - ky * 3u - kx]"));
    }

    #[test]
    fn variants_keep_at_most_32_sums() {
        for n in 1..=MAX_COLS {
            let c = SkinnyConfig::new(n, SkinnyA::RowMajor, SkinnyB::Rows);
            assert!(c.cols as usize >= n && c.cols * c.rows <= 32 && c.rows >= 2);
            assert!(c.wgsl().contains("@workgroup_size(64)"));
        }
    }
}
