//! GEGLU, the transformer blocks' feed-forward activation (diffusers' `GEGLU`: the projection's
//! output `h` `[.., 2F]` split into `hidden` and `gate` halves, `hidden * gelu(gate)` with the exact,
//! erf-based GELU), as one kernel where burn runs six (two slices made contiguous, divide, erf, add,
//! multiply twice), and its backward as one more:
//! - forward: one invocation per output value `[.., j]`: `h[j] * gelu(h[F + j])`;
//! - backward: one invocation per output value, writing both halves of `dh`: `dy * gelu(gate)` and
//!   `dy * hidden * gelu'(gate)`, with `gelu'(x) = Φ(x) + x φ(x)`, the exact derivative PyTorch's
//!   autograd uses (burn's `gelu_backward` is the derivative of the tanh approximation instead,
//!   about 1e-3 off near |x| = 2).
//!
//! `erf` is the Abramowitz-Stegun polynomial cubecl's own `erf` evaluates (maximum error 1.5e-7),
//! so the forward matches burn's GELU to rounding.

use super::Elem;
use std::fmt::Write;

/// Invocations per workgroup.
pub const THREADS: u32 = 256;

/// The forward (`grad: false`) or the backward kernel for values of type `x` (f32, or f16 read into
/// f32 and written back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GegluKernel {
    pub grad: bool,
    pub x: Elem,
}

impl GegluKernel {
    /// Params: rows, F (values per half row), groups_x (workgroups along x of a 2-D dispatch), 1
    /// unused. Forward bindings: `h`, `y`; backward: `h`, `dy`, `dh`.
    pub fn wgsl(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let ex = self.x;
        Elem::enable(w, &[ex]);
        let _ = writeln!(w, "struct Params {{ rows: u32, f: u32, gx: u32, u0: u32 }}");
        let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> h: array<{}>;", ex.wgsl());
        if self.grad {
            let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> dy: array<{}>;", ex.wgsl());
            let _ = writeln!(w, "@group(0) @binding(2) var<storage, read_write> dh: array<{}>;", ex.wgsl());
            let _ = writeln!(w, "@group(0) @binding(3) var<uniform> p: Params;");
        } else {
            let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> y: array<{}>;", ex.wgsl());
            let _ = writeln!(w, "@group(0) @binding(2) var<uniform> p: Params;");
        }
        // erf(x) for x >= 0 (Abramowitz and Stegun 7.1.26), odd.
        let _ = writeln!(w, "fn erf_(x: f32) -> f32 {{");
        let _ = writeln!(w, "  let a = abs(x); let t = 1.0 / (1.0 + 0.3275911 * a);");
        let _ = writeln!(w, "  let q = ((((1.0614054 * t - 1.453152) * t + 1.4214137) * t - 0.28449674) * t + 0.2548296) * t * exp(-a * a);");
        let _ = writeln!(w, "  return select(1.0 - q, q - 1.0, x < 0.0);");
        let _ = writeln!(w, "}}");
        let _ = writeln!(w, "@compute @workgroup_size({THREADS})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let i = (wid.x + wid.y * p.gx) * {THREADS}u + t;");
        let _ = writeln!(w, "  if (i >= p.rows * p.f) {{ return; }}");
        let _ = writeln!(w, "  let row = i / p.f; let j = i % p.f; let ia = row * 2u * p.f + j; let ig = ia + p.f;");
        let _ = writeln!(w, "  let a = {}; let g = {};", ex.read("h", "ia"), ex.read("h", "ig"));
        // Φ(g) = (1 + erf(g / sqrt 2)) / 2; gelu(g) = g Φ(g).
        let _ = writeln!(w, "  let cdf = 0.5 * (1.0 + erf_(g * 0.70710678118654752));");
        if self.grad {
            let _ = writeln!(w, "  let d = {};", ex.read("dy", "i"));
            // φ(g) = exp(-g² / 2) / sqrt(2π).
            let _ = writeln!(w, "  let pdf = 0.39894228040143268 * exp(-0.5 * g * g);");
            let _ = writeln!(w, "  dh[ia] = {};", ex.store("d * g * cdf"));
            let _ = writeln!(w, "  dh[ig] = {};", ex.store("d * a * (cdf + g * pdf)"));
        } else {
            let _ = writeln!(w, "  y[i] = {};", ex.store("a * g * cdf"));
        }
        let _ = writeln!(w, "}}");
        s
    }
}
