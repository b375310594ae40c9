//! GroupNorm (optionally followed by SiLU) and LayerNorm as two WGSL kernels with parallel
//! reductions, in place of burn's chain (mean, subtract, square, mean, add, sqrt, divide, multiply,
//! add: nine kernels and four full-size temporaries, reductions one invocation per row).
//!
//! The input `[b, c, s..]` is read as `rows = b * groups` rows of `len = c / groups * s` values
//! (LayerNorm over the last axis of `[rows, c]` is the case `groups = 1`, `s = 1`).
//! 1. `stats`: `lanes` invocations per row (a power of two up to the workgroup's 256, about a
//!    quarter of the row's length: see [`lanes`]), so a workgroup holds `256 / lanes` rows; each
//!    invocation sums a strided share of its row, the row's lanes add their partial sums as a tree;
//!    the mean, then (a second read) the mean of squared deviations, as PyTorch does (two passes: no
//!    cancellation of `E[x²] - E[x]²`). Writes `(mean, 1 / sqrt(var + eps))` per row.
//! 2. `apply`: one invocation per value: `(x - mean) * rstd * gamma[ch] + beta[ch]`, then SiLU
//!    where asked.
//!
//! Softmax over the last axis (attention scores) is the same shape of work: the row's lanes find
//! its maximum and the sum of exponentials (tree reductions), then write `exp(x - max) / sum`: one
//! kernel where burn runs five (max, subtract, exp, sum, divide).
//!
//! Learning differentiates through the norms (the weights, `gamma` and `beta` included, are frozen, so
//! only the input's gradient is wanted). With `xh = (x - mean) * rstd`, `y = gamma * xh + beta` and
//! `g = dL/dy * gamma` (`dL/dy` through SiLU where it follows), the input gradient is
//! `rstd * (g - mean(g) - xh * mean(g * xh))` over each row:
//! 3. `grad_sums`: each row's `sum(g)` and `sum(g * xh)` (the same lanes and trees as `stats`);
//! 4. `grad_apply`: one invocation per value. burn's autodiff of the chain above runs about 30
//!    kernels per norm (and keeps several full-size temporaries until the backward pass); these two,
//!    with the forward's statistics kept, read the input, not the output.
//!
//! Short rows are the reason for the lanes: LayerNorms over a few dozen channels for thousands of
//! rows (the text encoder scoring a vocabulary, the tiny models) with one 256-wide workgroup per row
//! left 7 of 8 invocations idle through eight barriers each, and took 60% of reading an
//! instruction's words on lavapipe.

use super::Elem;
use std::fmt::Write;

/// Invocations per workgroup of every kernel here.
pub const THREADS: u32 = 256;

/// Which kernel; `lanes`: invocations per row (a power of two, at most [`THREADS`]); `x`: the
/// element type of the input and output (f16 activations: read into f32, statistics and sums in
/// f32, written back in f16); `affine`: that of `gamma` and `beta`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKernel {
    /// Per-row mean and reciprocal standard deviation (always f32).
    Stats { lanes: u32, x: Elem },
    /// Normalise, scale and shift (and SiLU).
    Apply { silu: bool, x: Elem, affine: Elem },
    /// Softmax of each row.
    Softmax { lanes: u32, x: Elem },
    /// Per row `sum(g)` and `sum(g * xh)` (f32) for the input gradient (see the module's text).
    GradSums { lanes: u32, silu: bool, x: Elem, affine: Elem },
    /// The input gradient of each value.
    GradApply { silu: bool, x: Elem, affine: Elem },
}

/// Invocations per row for rows of `len` values: about four values each, a power of two from 1 to
/// [`THREADS`] (a workgroup then holds `THREADS / lanes` rows).
pub fn lanes(len: usize) -> u32 {
    (len.div_ceil(4).next_power_of_two().min(THREADS as usize)) as u32
}

/// A WGSL function `name(t, v)` combining the `v` of the `lanes` invocations of `t`'s row with `op`
/// (`{h}` stands for the partner's offset) as a tree in the workgroup array `part`; called in
/// uniform control flow.
fn reduction(w: &mut String, name: &str, op: &str, lanes: u32) {
    let _ = writeln!(w, "fn {name}(t: u32, v: f32) -> f32 {{");
    let _ = writeln!(w, "  part[t] = v; workgroupBarrier();");
    let mut half = lanes / 2;
    while half > 0 {
        let _ = writeln!(w, "  if (t % {lanes}u < {half}u) {{ part[t] = {}; }} workgroupBarrier();", op.replace("{h}", &half.to_string()));
        half /= 2;
    }
    let _ = writeln!(w, "  let r = part[t - t % {lanes}u]; workgroupBarrier(); return r;");
    let _ = writeln!(w, "}}");
}

/// The row and lane of invocation `t` of workgroup `wid` (rows of `lanes` invocations), and the
/// row's first value (a row past the end reads the last row, and writes nothing).
fn row_of(w: &mut String, lanes: u32) {
    let _ = writeln!(w, "  let row = (wid.x + wid.y * p.gx) * {}u + t / {lanes}u; let lane = t % {lanes}u;", THREADS / lanes);
    let _ = writeln!(w, "  let live = row < p.rows; let base = min(row, p.rows - 1u) * p.len;");
}

/// The gradient kernels' bindings from 0 on: the input `x`, the forward's `stats`, `gamma`, `beta`
/// (only with SiLU: without, nothing reads it, and WebGPU's layout would leave it out), the output's
/// gradient `dy` (in `x`'s type); and `fn grad(i, row) -> vec2<f32>`: `(g, xh)` of value `i` (see
/// the module's text). Returns the next free binding.
fn grad_common(w: &mut String, silu: bool, ex: Elem, affine: Elem) -> u32 {
    let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> x: array<{}>;", ex.wgsl());
    let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> stats: array<f32>;");
    let _ = writeln!(w, "@group(0) @binding(2) var<storage, read_write> gamma: array<{}>;", affine.wgsl());
    if silu {
        let _ = writeln!(w, "@group(0) @binding(3) var<storage, read_write> beta: array<{}>;", affine.wgsl());
    }
    let next = if silu { 4 } else { 3 };
    let _ = writeln!(w, "@group(0) @binding({next}) var<storage, read_write> dy: array<{}>;", ex.wgsl());
    let _ = writeln!(w, "fn grad(i: u32, row: u32) -> vec2<f32> {{");
    let _ = writeln!(w, "  let ch = (i / p.s) % p.c; let gm = {};", affine.read("gamma", "ch"));
    let _ = writeln!(w, "  let xh = ({} - stats[row * 2u]) * stats[row * 2u + 1u];", ex.read("x", "i"));
    let _ = writeln!(w, "  var d = {};", ex.read("dy", "i"));
    if silu {
        // d silu(y) / dy = s (1 + y (1 - s)), s = sigmoid(y).
        let _ = writeln!(w, "  let y = xh * gm + {}; let sg = 1.0 / (1.0 + exp(-y));", affine.read("beta", "ch"));
        let _ = writeln!(w, "  d = d * sg * (1.0 + y * (1.0 - sg));");
    }
    let _ = writeln!(w, "  return vec2<f32>(d * gm, xh);");
    let _ = writeln!(w, "}}");
    next + 1
}

impl NormKernel {
    /// Params of all: rows, len (values per row), s (values per channel), c (channels), eps (f32
    /// bits), groups_x (workgroups along x of a 2-D dispatch), 2 unused.
    pub fn wgsl(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        match *self {
            NormKernel::Stats { x, .. } | NormKernel::Softmax { x, .. } => Elem::enable(w, &[x]),
            NormKernel::Apply { x, affine, .. } | NormKernel::GradSums { x, affine, .. } | NormKernel::GradApply { x, affine, .. } => {
                Elem::enable(w, &[x, affine])
            }
        }
        let _ = writeln!(w, "struct Params {{ rows: u32, len: u32, s: u32, c: u32, eps: u32, gx: u32, u0: u32, u1: u32 }}");
        match *self {
            NormKernel::Stats { lanes, x: ex } => {
                let xi = ex.read("x", "base + i");
                let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> x: array<{}>;", ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> stats: array<f32>;");
                let _ = writeln!(w, "@group(0) @binding(2) var<uniform> p: Params;");
                let _ = writeln!(w, "var<workgroup> part: array<f32, {THREADS}>;");
                reduction(w, "reduce", "part[t] + part[t + {h}u]", lanes);
                let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
                let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
                // Every invocation of the workgroup runs the reductions (uniform control flow).
                row_of(w, lanes);
                let _ = writeln!(w, "  var acc = 0.0; for (var i = lane; i < p.len; i = i + {lanes}u) {{ acc = acc + {xi}; }}");
                let _ = writeln!(w, "  let mean = reduce(t, acc) / f32(p.len);");
                let _ =
                    writeln!(w, "  var sq = 0.0; for (var i = lane; i < p.len; i = i + {lanes}u) {{ let d = {xi} - mean; sq = sq + d * d; }}");
                let _ = writeln!(w, "  let var_ = reduce(t, sq) / f32(p.len);");
                let _ = writeln!(
                    w,
                    "  if (live && lane == 0u) {{ stats[row * 2u] = mean; stats[row * 2u + 1u] = 1.0 / sqrt(var_ + bitcast<f32>(p.eps)); }}"
                );
                let _ = writeln!(w, "}}");
            }
            NormKernel::Softmax { lanes, x: ex } => {
                let xi = ex.read("x", "base + i");
                let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> x: array<{}>;", ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> y: array<{}>;", ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding(2) var<uniform> p: Params;");
                let _ = writeln!(w, "var<workgroup> part: array<f32, {THREADS}>;");
                reduction(w, "reduce_max", "max(part[t], part[t + {h}u])", lanes);
                reduction(w, "reduce_sum", "part[t] + part[t + {h}u]", lanes);
                let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
                let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
                row_of(w, lanes);
                // -inf entries (masked positions) give exp(-inf) = 0; a row of only -inf gives NaN,
                // as PyTorch's softmax does.
                let _ =
                    writeln!(w, "  var m = -3.4028234663852886e38; for (var i = lane; i < p.len; i = i + {lanes}u) {{ m = max(m, {xi}); }}");
                let _ = writeln!(w, "  let mx = reduce_max(t, m);");
                let _ = writeln!(w, "  var acc = 0.0; for (var i = lane; i < p.len; i = i + {lanes}u) {{ acc = acc + exp({xi} - mx); }}");
                let _ = writeln!(w, "  let inv = 1.0 / reduce_sum(t, acc);");
                let _ = writeln!(
                    w,
                    "  if (live) {{ for (var i = lane; i < p.len; i = i + {lanes}u) {{ y[base + i] = {}; }} }}",
                    ex.store(&format!("exp({xi} - mx) * inv"))
                );
                let _ = writeln!(w, "}}");
            }
            NormKernel::Apply { silu, x: ex, affine } => {
                let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> x: array<{}>;", ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> stats: array<f32>;");
                let _ = writeln!(w, "@group(0) @binding(2) var<storage, read_write> gamma: array<{}>;", affine.wgsl());
                let _ = writeln!(w, "@group(0) @binding(3) var<storage, read_write> beta: array<{}>;", affine.wgsl());
                let _ = writeln!(w, "@group(0) @binding(4) var<storage, read_write> y: array<{}>;", ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding(5) var<uniform> p: Params;");
                let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
                let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
                let _ = writeln!(w, "  let i = (wid.x + wid.y * p.gx) * {THREADS}u + t;");
                let _ = writeln!(w, "  if (i >= p.rows * p.len) {{ return; }}");
                let _ = writeln!(w, "  let row = i / p.len; let ch = (i / p.s) % p.c;");
                let _ = writeln!(
                    w,
                    "  var v = ({} - stats[row * 2u]) * stats[row * 2u + 1u] * {} + {};",
                    ex.read("x", "i"),
                    affine.read("gamma", "ch"),
                    affine.read("beta", "ch")
                );
                if silu {
                    let _ = writeln!(w, "  v = v / (1.0 + exp(-v));");
                }
                let _ = writeln!(w, "  y[i] = {};", ex.store("v"));
                let _ = writeln!(w, "}}");
            }
            NormKernel::GradSums { lanes, silu, x: ex, affine } => {
                let b = grad_common(w, silu, ex, affine);
                let _ = writeln!(w, "@group(0) @binding({b}) var<storage, read_write> sums: array<f32>;");
                let _ = writeln!(w, "@group(0) @binding({}) var<uniform> p: Params;", b + 1);
                let _ = writeln!(w, "var<workgroup> part: array<f32, {THREADS}>;");
                reduction(w, "reduce", "part[t] + part[t + {h}u]", lanes);
                let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
                let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
                row_of(w, lanes);
                let _ = writeln!(w, "  let r = min(row, p.rows - 1u);");
                let _ = writeln!(w, "  var a = 0.0; var b = 0.0;");
                let _ = writeln!(
                    w,
                    "  for (var i = lane; i < p.len; i = i + {lanes}u) {{ let gx = grad(base + i, r); a = a + gx.x; b = b + gx.x * gx.y; }}"
                );
                let _ = writeln!(w, "  let sa = reduce(t, a); let sb = reduce(t, b);");
                let _ = writeln!(w, "  if (live && lane == 0u) {{ sums[row * 2u] = sa; sums[row * 2u + 1u] = sb; }}");
                let _ = writeln!(w, "}}");
            }
            NormKernel::GradApply { silu, x: ex, affine } => {
                let b = grad_common(w, silu, ex, affine);
                let _ = writeln!(w, "@group(0) @binding({b}) var<storage, read_write> sums: array<f32>;");
                let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> dx: array<{}>;", b + 1, ex.wgsl());
                let _ = writeln!(w, "@group(0) @binding({}) var<uniform> p: Params;", b + 2);
                let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
                let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
                let _ = writeln!(w, "  let i = (wid.x + wid.y * p.gx) * {THREADS}u + t;");
                let _ = writeln!(w, "  if (i >= p.rows * p.len) {{ return; }}");
                let _ = writeln!(w, "  let row = i / p.len; let gx = grad(i, row); let n = f32(p.len);");
                let _ =
                    writeln!(w, "  dx[i] = {};", ex.store("stats[row * 2u + 1u] * (gx.x - sums[row * 2u] / n - gx.y * (sums[row * 2u + 1u] / n))"));
                let _ = writeln!(w, "}}");
            }
        }
        s
    }
}
