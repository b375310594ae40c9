//! Scaled dot-product attention in one WGSL kernel (the flash-attention forward: the scores are never
//! written out), in place of burn's chain (split heads, `q kᵀ`, scale, softmax, `· v`, merge heads:
//! a `[b, heads, n, m]` score tensor written and read three times; at 64 x 64 latents that is
//! 8 x 4096 x 4096 values, 512 MiB, per self-attention).
//!
//! `q` `[b, n, heads * d]`, `k` and `v` `[b, m, heads * d]` are read where the Linear layers wrote
//! them (no head split), the output `[b, n, heads * d]` is written for `to_out` directly. Each
//! invocation owns one query row of one head (or 2-8: [`FlashConfig::rows`]) and keeps the row
//! (scaled) and its output in registers; a workgroup of 64 invocations walks the keys in blocks
//! staged in workgroup memory (every invocation reads the same key: a broadcast), with the online
//! softmax: a running maximum `mx`, the running sum `l`
//! of `exp(s - mx)`, and the output rescaled by `exp(mx_old - mx_new)` when the maximum grows. The
//! result is `o / l`, softmax(q kᵀ / sqrt(d)) v up to the order of the sums.
//!
//! Head dims that are multiples of 4 up to [`MAX_HEAD_DIM`] (registers: `2 d` per row), which takes the
//! UNet's 1280-channel levels (8 heads of 160); wider ones (the VAE's single 512-wide head) stay on
//! burn's ops. `causal` masks the keys
//! after the query's own position (CLIP's text encoder).

use super::Elem;
use std::fmt::Write;

/// Invocations (query rows) per workgroup.
pub const THREADS: u32 = 64;

/// The largest head dim compiled: InstructPix2Pix's (SD 1.5's) widest, 1280 channels in 8 heads.
/// (Until session 28 it was 128, and those six transformers' attentions ran burn's chain, in learning
/// its backward too: the full UNet's learning step at 8 x 8 latents ran 1,254 more kernel launches
/// over two steps.) On a GPU a row of 160 keeps
/// 320 floats in registers forward and 640 for dK / dV; unmeasured there.
pub const MAX_HEAD_DIM: usize = 160;

/// A compiled variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// The head dim.
    pub d: u32,
    pub causal: bool,
    /// The element type of `q`, `k`, `v` and the output (read into f32; the softmax and sums in f32).
    pub elem: Elem,
    /// Also writes each row's log-sum-exp `mx + ln(l)` (f32, `[b, heads, n]`) for the backward
    /// ([`FlashGradConfig`]).
    pub lse: bool,
    /// Query rows per invocation (1, 2, 4 or 8): each key and value read from workgroup memory serves
    /// that many rows (CPU adapters gather every such read lane by lane).
    pub rows: u32,
}

impl FlashConfig {
    /// Keys per block staged in workgroup memory: `k` and `v` blocks within 8 KiB each (WebGPU
    /// guarantees 16 KiB of workgroup memory).
    pub fn block(&self) -> u32 {
        block_within(8 * self.d)
    }

    /// The WGSL source; entry point `main`. Params: `n, m, qs (q / output row stride), ks (k / v row
    /// stride), heads, scale (f32 bits)`. Dispatch: `x` blocks of [`FlashConfig::rows_per_group`]
    /// query rows, `y` batch x heads. The rows, the outputs and the staged keys / values are `vec4`s
    /// (head dims are multiples of 4); each staged key and value is read from workgroup memory once
    /// per key into registers and used for all `rows` rows of the invocation.
    pub fn wgsl(&self) -> String {
        assert!(self.d % 4 == 0 && self.d as usize <= MAX_HEAD_DIM, "unsupported head dim {}", self.d);
        assert!(matches!(self.rows, 1 | 2 | 4 | 8), "rows per invocation {}", self.rows);
        let (d, bc, t, rows) = (self.d, self.block(), THREADS, self.rows);
        let d4 = d / 4;
        let mut s = String::new();
        let w = &mut s;
        let e = self.elem;
        let ty = e.wgsl();
        let bufs: &[(&str, &str)] = &[("q", ty), ("k", ty), ("v", ty), ("o", ty), ("lse", "f32")];
        open_kernel(w, e, &bufs[..4 + self.lse as usize], (bc, d4), false, rows);
        for r in 0..rows {
            let _ = writeln!(w, "  let i{r} = g0 + {}u + t; let qb{r} = (bi * p.n + min(i{r}, p.n - 1u)) * p.qs + h * {d}u;", r * t);
            for c in 0..d4 {
                let _ = writeln!(w, "  let q{r}_{c} = {} * scale; var o{r}_{c} = vec4<f32>(0.0);", load4(e, "q", &format!("(qb{r} + {}u)", 4 * c)));
            }
            let _ = writeln!(w, "  var mx{r} = -3.0e38; var l{r} = 0.0;");
        }
        open_key_loop(w, e, d, self.causal, rows, bc);
        for r in 0..rows {
            let _ = writeln!(w, "      {{ let acc = {};", dot(&format!("q{r}_"), "ks", d4));
            let _ = writeln!(w, "      let sc = (acc.x + acc.y) + (acc.z + acc.w);");
            let valid = if self.causal { format!("j < p.m && j <= i{r}") } else { "j < p.m".into() };
            let _ = writeln!(w, "      if ({valid}) {{");
            let _ = write!(w, "        if (sc > mx{r}) {{ let f = exp(mx{r} - sc); l{r} = l{r} * f;");
            for c in 0..d4 {
                let _ = write!(w, " o{r}_{c} = o{r}_{c} * f;");
            }
            let _ = writeln!(w, " mx{r} = sc; }}");
            let _ = write!(w, "        let e = exp(sc - mx{r}); l{r} = l{r} + e; let ev = vec4<f32>(e);");
            for c in 0..d4 {
                let _ = write!(w, " o{r}_{c} = fma(ev, vs{c}, o{r}_{c});");
            }
            let _ = writeln!(w);
            let _ = writeln!(w, "      }} }}");
        }
        close_block_loop(w);
        for r in 0..rows {
            let _ = writeln!(w, "  if (i{r} < p.n) {{");
            let _ = writeln!(w, "    let r = 1.0 / l{r};");
            if self.lse {
                let _ = writeln!(w, "    lse[wid.y * p.n + i{r}] = mx{r} + log(l{r});");
            }
            for c in 0..d4 {
                let _ = writeln!(w, "    {{ let y = o{r}_{c} * r; {} }}", store4(e, "o", &format!("(qb{r} + {}u)", 4 * c), "y"));
            }
            let _ = writeln!(w, "  }}");
        }
        let _ = writeln!(w, "}}");
        s
    }

    /// Query rows per workgroup.
    pub fn rows_per_group(&self) -> u32 {
        THREADS * self.rows
    }
}

/// The largest power-of-two block (at most 32 rows) of `row_bytes` each within WebGPU's guaranteed
/// 16 KiB of workgroup memory.
fn block_within(row_bytes: u32) -> u32 {
    let fit = 16384 / row_bytes.max(1);
    let mut b = 1;
    while b * 2 <= fit.min(32) {
        b *= 2;
    }
    b
}

/// The opening every attention kernel shares: the `enable`s, `Params`, the storage buffers `bufs`
/// (name, element type) in binding order and then the uniform, the workgroup arrays `at` and `bt`
/// of a block of `bc` staged rows of `d4` `vec4`s (and with `stats` `st`, the block's `(L, D)`
/// pairs), and `main` up to the batch `bi`, the head `h`, `scale` and `g0`, the workgroup's first
/// row.
fn open_kernel(w: &mut String, e: Elem, bufs: &[(&str, &str)], (bc, d4): (u32, u32), stats: bool, rows: u32) {
    Elem::enable(w, &[e]);
    let _ = writeln!(w, "struct Params {{ n: u32, m: u32, qs: u32, ks: u32, heads: u32, scale: u32, u0: u32, u1: u32 }}");
    for (i, (name, ty)) in bufs.iter().enumerate() {
        let _ = writeln!(w, "@group(0) @binding({i}) var<storage, read_write> {name}: array<{ty}>;");
    }
    let _ = writeln!(w, "@group(0) @binding({}) var<uniform> p: Params;", bufs.len());
    let _ = writeln!(w, "var<workgroup> at: array<vec4<f32>, {}>;", bc * d4);
    let _ = writeln!(w, "var<workgroup> bt: array<vec4<f32>, {}>;", bc * d4);
    if stats {
        let _ = writeln!(w, "var<workgroup> st: array<vec2<f32>, {bc}>;");
    }
    let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
    let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
    let _ = writeln!(w, "  let bi = wid.y / p.heads; let h = wid.y % p.heads;");
    let _ = writeln!(w, "  let scale = bitcast<f32>(p.scale); let g0 = wid.x * {}u;", THREADS * rows);
}

/// Opens the walk over the keys of the forward and of dQ: blocks of `bc` keys and values staged
/// (`causal`: only up to the workgroup's last row), then per key `j` its staged row in `ks{c}` /
/// `vs{c}`. The caller writes the key's work and closes with a barrier and two braces.
fn open_key_loop(w: &mut String, e: Elem, d: u32, causal: bool, rows: u32, bc: u32) {
    let d4 = d / 4;
    let _ = writeln!(w, "  let kb = bi * p.m * p.ks + h * {d}u;");
    if causal {
        let _ = writeln!(w, "  let kend = min(p.m, g0 + {}u);", THREADS * rows);
    } else {
        let _ = writeln!(w, "  let kend = p.m;");
    }
    stage_blocks(w, e, "j0", "0u", "kend", "kb", "p.m - 1u", "p.ks", ("k", "v"), bc, d4);
    let _ = writeln!(w, "    workgroupBarrier();");
    let _ = writeln!(w, "    for (var jj = 0u; jj < {bc}u; jj = jj + 1u) {{");
    let _ = writeln!(w, "      let j = j0 + jj; let kr = jj * {d4}u;");
    staged_row(w, d4);
}

/// Closes the loop over one block's staged rows and the loop over blocks (after a barrier, so the
/// next block is staged only once every invocation is done with this one).
fn close_block_loop(w: &mut String) {
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "    workgroupBarrier();");
    let _ = writeln!(w, "  }}");
}

/// Opens the loop over blocks of `bc` rows, `{var}` from `from` while below `end`, and stages each
/// block's rows of `x` and `y` (element type `e`; row `r` from `{base} + min(r, {last}) * {stride}`:
/// rows past the end repeat the last one, which the work masks) in `at` and `bt`. Branch-free.
/// The caller adds a barrier, the block's work, a barrier and the closing brace.
#[allow(clippy::too_many_arguments)]
fn stage_blocks(
    w: &mut String,
    e: Elem,
    var: &str,
    from: &str,
    end: &str,
    base: &str,
    last: &str,
    stride: &str,
    (x, y): (&str, &str),
    bc: u32,
    d4: u32,
) {
    let _ = writeln!(w, "  for (var {var} = {from}; {var} < {end}; {var} = {var} + {bc}u) {{");
    let _ = writeln!(w, "    for (var e = t; e < {}u; e = e + {THREADS}u) {{", bc * d4);
    let _ = writeln!(w, "      let a = {base} + min({var} + e / {d4}u, {last}) * {stride} + (e % {d4}u) * 4u;");
    let _ = writeln!(w, "      at[e] = {}; bt[e] = {};", load4(e, x, "a"), load4(e, y, "a"));
    let _ = writeln!(w, "    }}");
}

/// The staged row at `kr` into registers: `ks{c}` from `at`, `vs{c}` from `bt` (read once, used by
/// every row of the invocation).
fn staged_row(w: &mut String, d4: u32) {
    let _ = write!(w, "     ");
    for c in 0..d4 {
        let _ = write!(w, " let ks{c} = at[kr + {c}u]; let vs{c} = bt[kr + {c}u];");
    }
    let _ = writeln!(w);
}

/// The `vec4` dot product of the registers `{x}{c}` and `{y}{c}` (fma in order of `c`).
fn dot(x: &str, y: &str, d4: u32) -> String {
    (0..d4).fold(String::from("vec4<f32>(0.0)"), |acc, c| format!("fma({x}{c}, {y}{c}, {acc})"))
}

/// One row's terms in the backward, opening a block the caller closes: its score `sc` against the
/// staged row (`{x}{c}` with `ks{c}`), `dp` (`{y}{c}` with `vs{c}`), the weight `pr = exp(sc - L)`
/// (0 where not `valid`) and `ds = pr (dp - D)` as a `vec4`.
fn grad_terms(w: &mut String, d4: u32, (x, y): (&str, &str), valid: &str, (l, dsum): (&str, &str)) {
    let _ = writeln!(w, "      {{ let sv = {}; let gv = {};", dot(x, "ks", d4), dot(y, "vs", d4));
    let _ = writeln!(w, "      let sc = (sv.x + sv.y) + (sv.z + sv.w); let dp = (gv.x + gv.y) + (gv.z + gv.w);");
    let _ = writeln!(w, "      let pr = select(0.0, exp(sc - {l}), {valid}); let ds = vec4<f32>(pr * (dp - {dsum}));");
}

/// Four consecutive values of `buf` (of element type `e`) from `at` as a `vec4<f32>`.
fn load4(e: Elem, buf: &str, at: &str) -> String {
    match e {
        Elem::F32 => format!("vec4<f32>({buf}[{at}], {buf}[{at} + 1u], {buf}[{at} + 2u], {buf}[{at} + 3u])"),
        Elem::F16 => format!("vec4<f32>(vec4<f16>({buf}[{at}], {buf}[{at} + 1u], {buf}[{at} + 2u], {buf}[{at} + 3u]))"),
        Elem::Q8 { .. } => unreachable!("attention reads floats"),
    }
}

/// Stores the `vec4<f32>` `y` into four consecutive values of `buf` from `at`.
fn store4(e: Elem, buf: &str, at: &str, y: &str) -> String {
    format!(
        "{buf}[{at}] = {}; {buf}[{at} + 1u] = {}; {buf}[{at} + 2u] = {}; {buf}[{at} + 3u] = {};",
        e.store(&format!("{y}.x")),
        e.store(&format!("{y}.y")),
        e.store(&format!("{y}.z")),
        e.store(&format!("{y}.w"))
    )
}

/// Which gradients a backward kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradPart {
    /// `dQ` (one query row per invocation, walking the keys), and `D = rowsum(dO ∘ O)` for [`GradPart::DkDv`].
    Dq,
    /// `dK` and `dV` (one key row per invocation, walking the queries).
    DkDv,
}

/// The flash-attention backward (FlashAttention-2's): with the forward's log-sum-exp `L` per query
/// row, the weights are recomputed as `P = exp(s q kᵀ - L)` block by block and never stored:
///
/// ```text
/// D  = rowsum(dO ∘ O)            dP = dO vᵀ         dS = P ∘ (dP - D)
/// dQ = s dS k                    dK = s dSᵀ q       dV = Pᵀ dO
/// ```
///
/// Two kernels: [`GradPart::Dq`] (an invocation per query row: its `q`, `dO` and `dQ` in registers,
/// key / value blocks staged in workgroup memory as in the forward; it also writes `D`), then
/// [`GradPart::DkDv`] (an invocation per key row: its `k`, `v`, `dK`, `dV` in registers, blocks of
/// `q`, `dO`, `L` and `D` staged). Masked keys (past `m`, or after the query in `causal`) get
/// `P = 0` through `select`, not a branch (the loop bodies are branch-free: SwiftShader's compiler
/// and CPU lanes pay for branches, see `kernels::image_value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashGradConfig {
    pub d: u32,
    pub causal: bool,
    /// The element type of `q`, `k`, `v`, `O`, `dO` and the gradients (`L`, `D` and all sums f32).
    pub elem: Elem,
    pub part: GradPart,
    /// Rows per invocation (1, 2 or 4), as the forward's [`FlashConfig::rows`].
    pub rows: u32,
}

impl FlashGradConfig {
    /// Rows per block staged in workgroup memory: two `vec4` arrays of `d` floats per row (as the
    /// forward's) and, for dK / dV, the row's `(L, D)` pair, all within WebGPU's 16 KiB.
    pub fn block(&self) -> u32 {
        block_within(self.staged_row_bytes())
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        self.block() * self.staged_row_bytes()
    }

    /// Workgroup memory per staged row: two `vec4` rows of `d` floats, and dK / dV's `(L, D)`.
    fn staged_row_bytes(&self) -> u32 {
        8 * self.d + if self.part == GradPart::DkDv { 8 } else { 0 }
    }

    /// The WGSL source; entry point `main`. Params as the forward's: `n, m, qs, ks, heads, scale`.
    /// Bindings, [`GradPart::Dq`]: `q, k, v, o, g (dO), lse, dd (D, written), dq`; dispatch `x`
    /// blocks of [`FlashGradConfig::rows_per_group`] query rows. [`GradPart::DkDv`]: `q, k, v, g,
    /// lse, dd, dk, dv`; `x` blocks of as many key rows. `y`: batch x heads. Each staged row is read
    /// from workgroup memory once per step into registers and used for the invocation's `rows` rows.
    pub fn wgsl(&self) -> String {
        assert!(self.d % 4 == 0 && self.d as usize <= MAX_HEAD_DIM, "unsupported head dim {}", self.d);
        assert!(matches!(self.rows, 1 | 2 | 4), "rows per invocation {}", self.rows);
        let (d, bc, t, e, rows) = (self.d, self.block(), THREADS, self.elem, self.rows);
        let d4 = d / 4;
        let ty = e.wgsl();
        let mut s = String::new();
        let w = &mut s;
        let bufs: &[(&str, &str)] = match self.part {
            GradPart::Dq => &[("q", ty), ("k", ty), ("v", ty), ("o", ty), ("g", ty), ("lse", "f32"), ("dd", "f32"), ("dq", ty)],
            GradPart::DkDv => &[("q", ty), ("k", ty), ("v", ty), ("g", ty), ("lse", "f32"), ("dd", "f32"), ("dk", ty), ("dv", ty)],
        };
        // Staged blocks: keys and values (dQ) or queries, output gradients and (L, D) (dK, dV).
        open_kernel(w, e, bufs, (bc, d4), self.part == GradPart::DkDv, rows);
        match self.part {
            GradPart::Dq => {
                for r in 0..rows {
                    let _ = writeln!(w, "  let i{r} = g0 + {}u + t; let qb{r} = (bi * p.n + min(i{r}, p.n - 1u)) * p.qs + h * {d}u;", r * t);
                    let _ = writeln!(w, "  var od{r} = vec4<f32>(0.0);");
                    for c in 0..d4 {
                        let at = format!("(qb{r} + {}u)", 4 * c);
                        let _ = writeln!(
                            w,
                            "  let q{r}_{c} = {} * scale; let g{r}_{c} = {}; var a{r}_{c} = vec4<f32>(0.0); od{r} = fma(g{r}_{c}, {}, od{r});",
                            load4(e, "q", &at),
                            load4(e, "g", &at),
                            load4(e, "o", &at)
                        );
                    }
                    let _ = writeln!(w, "  let dsum{r} = (od{r}.x + od{r}.y) + (od{r}.z + od{r}.w);");
                    let _ = writeln!(w, "  let lrow{r} = lse[wid.y * p.n + min(i{r}, p.n - 1u)];");
                }
                open_key_loop(w, e, d, self.causal, rows, bc);
                for r in 0..rows {
                    let valid = if self.causal { format!("(j < p.m) & (j <= i{r})") } else { "j < p.m".into() };
                    grad_terms(w, d4, (&format!("q{r}_"), &format!("g{r}_")), &valid, (&format!("lrow{r}"), &format!("dsum{r}")));
                    let _ = write!(w, "     ");
                    for c in 0..d4 {
                        let _ = write!(w, " a{r}_{c} = fma(ds, ks{c}, a{r}_{c});");
                    }
                    let _ = writeln!(w, " }}");
                }
                close_block_loop(w);
                for r in 0..rows {
                    let _ = writeln!(w, "  if (i{r} < p.n) {{");
                    let _ = writeln!(w, "    dd[wid.y * p.n + i{r}] = dsum{r};");
                    for c in 0..d4 {
                        let _ = writeln!(w, "    {{ let y = a{r}_{c} * scale; {} }}", store4(e, "dq", &format!("(qb{r} + {}u)", 4 * c), "y"));
                    }
                    let _ = writeln!(w, "  }}");
                }
            }
            GradPart::DkDv => {
                for r in 0..rows {
                    let _ = writeln!(w, "  let j{r} = g0 + {}u + t; let kb{r} = (bi * p.m + min(j{r}, p.m - 1u)) * p.ks + h * {d}u;", r * t);
                    for c in 0..d4 {
                        let at = format!("(kb{r} + {}u)", 4 * c);
                        let _ = writeln!(
                            w,
                            "  let k{r}_{c} = {} * scale; let v{r}_{c} = {}; var dk{r}_{c} = vec4<f32>(0.0); var dv{r}_{c} = vec4<f32>(0.0);",
                            load4(e, "k", &at),
                            load4(e, "v", &at)
                        );
                    }
                }
                let _ = writeln!(w, "  let qb = bi * p.n * p.qs + h * {d}u; let sb = wid.y * p.n;");
                // Causal: queries before the workgroup's first key see none of its keys (the block
                // divides the rows per workgroup, so the blocks stay aligned).
                let start = if self.causal { "g0" } else { "0u" };
                stage_blocks(w, e, "i0", start, "p.n", "qb", "p.n - 1u", "p.qs", ("q", "g"), bc, d4);
                let _ = writeln!(w, "    for (var e = t; e < {bc}u; e = e + {t}u) {{");
                let _ = writeln!(w, "      let i = sb + min(i0 + e, p.n - 1u); st[e] = vec2<f32>(lse[i], dd[i]);");
                let _ = writeln!(w, "    }}");
                let _ = writeln!(w, "    workgroupBarrier();");
                let _ = writeln!(w, "    for (var ii = 0u; ii < {bc}u; ii = ii + 1u) {{");
                let _ = writeln!(w, "      let i = i0 + ii; let kr = ii * {d4}u; let ld = st[ii];");
                staged_row(w, d4);
                for r in 0..rows {
                    let valid = if self.causal { format!("(i < p.n) & (j{r} <= i)") } else { "i < p.n".into() };
                    grad_terms(w, d4, (&format!("k{r}_"), &format!("v{r}_")), &valid, ("ld.x", "ld.y"));
                    let _ = write!(w, "      let pv = vec4<f32>(pr);");
                    for c in 0..d4 {
                        let _ = write!(w, " dv{r}_{c} = fma(pv, vs{c}, dv{r}_{c}); dk{r}_{c} = fma(ds, ks{c}, dk{r}_{c});");
                    }
                    let _ = writeln!(w, " }}");
                }
                close_block_loop(w);
                for r in 0..rows {
                    let _ = writeln!(w, "  if (j{r} < p.m) {{");
                    for c in 0..d4 {
                        let at = format!("(kb{r} + {}u)", 4 * c);
                        let _ = writeln!(w, "    {{ let y = dk{r}_{c} * scale; {} }}", store4(e, "dk", &at, "y"));
                        let _ = writeln!(w, "    {}", store4(e, "dv", &at, &format!("dv{r}_{c}")));
                    }
                    let _ = writeln!(w, "  }}");
                }
            }
        }
        let _ = writeln!(w, "}}");
        s
    }

    /// Rows (query rows for [`GradPart::Dq`], key rows for [`GradPart::DkDv`]) per workgroup.
    pub fn rows_per_group(&self) -> u32 {
        THREADS * self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_blocks_fit_workgroup_memory() {
        for d in [4, 8, 40, 64, 80, 128] {
            let c = FlashConfig { d, causal: false, elem: Elem::F32, lse: false, rows: 1 };
            let b = c.block();
            assert!(b.is_power_of_two() && b * d * 4 * 2 <= 16384 && b <= 32, "d {d}: block {b}");
            assert!(c.wgsl().contains("@workgroup_size(64)"));
        }
        assert_eq!(FlashConfig { d: 40, causal: false, elem: Elem::F32, lse: false, rows: 1 }.block(), 32);
    }

    /// The backward kernels' loops over staged rows have no branch (masks are `select`s): a branch
    /// per key costs CPU lanes more than the work, and SwiftShader's compiler blew up on such loops.
    #[test]
    fn backward_loops_are_branch_free() {
        for part in [GradPart::Dq, GradPart::DkDv] {
            for (rows, causal, elem) in [(1, false, Elem::F32), (2, true, Elem::F32), (4, true, Elem::F16)] {
                let src = FlashGradConfig { d: 40, causal, elem, part, rows }.wgsl();
                let from = src.find("    for (var ").expect("a staged-row loop");
                let to = src.rfind("workgroupBarrier();").expect("a barrier");
                let body = &src[from..to];
                assert!(!body.contains("if (") && !body.contains("&&"), "{part:?}, {rows} rows, causal {causal}:\n{body}");
                // After the loops: every value of each gradient row written (40 per row), and `D` per row.
                let outs = if part == GradPart::Dq { 1 } else { 2 };
                assert_eq!(
                    src.matches("] = ").count() - body.matches("] = ").count(),
                    outs * 40 * rows as usize + if part == GradPart::Dq { rows as usize } else { 0 },
                    "{part:?}"
                );
            }
        }
        assert_eq!(FlashConfig { d: 128, causal: true, elem: Elem::F16, lse: true, rows: 1 }.block(), 16);
        // The backward's blocks too, dK / dV with its (L, D) pairs: 64 and 128 wide heads need smaller
        // blocks there (16 and 8 rows; 32 and 16 would declare 16640 bytes).
        for d in (4..=MAX_HEAD_DIM as u32).step_by(4) {
            for part in [GradPart::Dq, GradPart::DkDv] {
                let c = FlashGradConfig { d, causal: true, elem: Elem::F32, part, rows: 4 };
                let b = c.block();
                assert!(
                    b.is_power_of_two() && b <= 32 && 256 % b == 0 && c.workgroup_bytes() <= 16384,
                    "d {d} {part:?}: block {b}, {} bytes",
                    c.workgroup_bytes()
                );
                let declared = c.wgsl().lines().filter(|l| l.starts_with("var<workgroup>")).count();
                assert_eq!(declared, if part == GradPart::DkDv { 3 } else { 2 });
            }
        }
        assert_eq!(FlashGradConfig { d: 64, causal: true, elem: Elem::F32, part: GradPart::DkDv, rows: 1 }.block(), 16);
        assert_eq!(FlashGradConfig { d: 128, causal: false, elem: Elem::F16, part: GradPart::DkDv, rows: 1 }.block(), 8);
        assert_eq!(FlashGradConfig { d: 64, causal: true, elem: Elem::F32, part: GradPart::Dq, rows: 1 }.block(), 32);
    }
}
