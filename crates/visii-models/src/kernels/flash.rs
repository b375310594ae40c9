//! Scaled dot-product attention in one WGSL kernel (the flash-attention forward: the scores are never
//! written out), in place of burn's chain (split heads, `q kᵀ`, scale, softmax, `· v`, merge heads:
//! a `[b, heads, n, m]` score tensor written and read three times; at 64 x 64 latents that is
//! 8 x 4096 x 4096 values, 512 MiB, per self-attention).
//!
//! `q` `[b, n, heads * d]`, `k` and `v` `[b, m, heads * d]` are read where the Linear layers wrote
//! them (no head split), the output `[b, n, heads * d]` is written for `to_out` directly. Each
//! invocation owns one query row of one head and keeps the row (scaled) and its output in registers;
//! a workgroup of 64 rows walks the keys in blocks staged in workgroup memory (every invocation reads
//! the same key: a broadcast), with the online softmax: a running maximum `mx`, the running sum `l`
//! of `exp(s - mx)`, and the output rescaled by `exp(mx_old - mx_new)` when the maximum grows. The
//! result is `o / l`, softmax(q kᵀ / sqrt(d)) v up to the order of the sums.
//!
//! Head dims that are multiples of 4 up to [`MAX_HEAD_DIM`] (registers: `2 d` per invocation); others (the UNet's
//! deepest level at 160, the VAE's single 512-wide head) stay on burn's ops. `causal` masks the keys
//! after the query's own position (CLIP's text encoder).

use super::Elem;
use std::fmt::Write;

/// Invocations (query rows) per workgroup.
pub const THREADS: u32 = 64;

/// The largest head dim compiled.
pub const MAX_HEAD_DIM: usize = 128;

/// A compiled variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// The head dim.
    pub d: u32,
    pub causal: bool,
    /// The element type of `q`, `k`, `v` and the output (read into f32; the softmax and sums in f32).
    pub elem: Elem,
}

impl FlashConfig {
    /// Keys per block staged in workgroup memory: `k` and `v` blocks within 8 KiB each (WebGPU
    /// guarantees 16 KiB of workgroup memory).
    pub fn block(&self) -> u32 {
        let fit = 2048 / self.d.max(1);
        let mut b = 1;
        while b * 2 <= fit.min(32) {
            b *= 2;
        }
        b
    }

    /// The WGSL source; entry point `main`. Params: `n, m, qs (q / output row stride), ks (k / v row
    /// stride), heads, scale (f32 bits)`. Dispatch: `x` blocks of 64 query rows, `y` batch x heads.
    /// The row, the output and the staged keys / values are `vec4`s (head dims are multiples of 4).
    pub fn wgsl(&self) -> String {
        assert!(self.d % 4 == 0 && self.d as usize <= MAX_HEAD_DIM, "unsupported head dim {}", self.d);
        let (d, bc, t) = (self.d, self.block(), THREADS);
        let d4 = d / 4;
        let mut s = String::new();
        let w = &mut s;
        let e = self.elem;
        let ty = e.wgsl();
        // Four consecutive values of `buf` from `at` as a vec4<f32>.
        let vec4 = |buf: &str, at: &str| match e {
            Elem::F32 => format!("vec4<f32>({buf}[{at}], {buf}[{at} + 1u], {buf}[{at} + 2u], {buf}[{at} + 3u])"),
            Elem::F16 => format!("vec4<f32>(vec4<f16>({buf}[{at}], {buf}[{at} + 1u], {buf}[{at} + 2u], {buf}[{at} + 3u]))"),
            Elem::Q8 { .. } => unreachable!("attention reads floats"),
        };
        Elem::enable(w, &[e]);
        let _ = writeln!(w, "struct Params {{ n: u32, m: u32, qs: u32, ks: u32, heads: u32, scale: u32, u0: u32, u1: u32 }}");
        let _ = writeln!(w, "@group(0) @binding(0) var<storage, read_write> q: array<{ty}>;");
        let _ = writeln!(w, "@group(0) @binding(1) var<storage, read_write> k: array<{ty}>;");
        let _ = writeln!(w, "@group(0) @binding(2) var<storage, read_write> v: array<{ty}>;");
        let _ = writeln!(w, "@group(0) @binding(3) var<storage, read_write> o: array<{ty}>;");
        let _ = writeln!(w, "@group(0) @binding(4) var<uniform> p: Params;");
        let _ = writeln!(w, "var<workgroup> kt: array<vec4<f32>, {}>;", bc * d4);
        let _ = writeln!(w, "var<workgroup> vt: array<vec4<f32>, {}>;", bc * d4);
        let _ = writeln!(w, "@compute @workgroup_size({t})");
        let _ = writeln!(w, "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {{");
        let _ = writeln!(w, "  let bi = wid.y / p.heads; let h = wid.y % p.heads;");
        let _ = writeln!(w, "  let i = wid.x * {t}u + t; let row = min(i, p.n - 1u);");
        let _ = writeln!(w, "  let scale = bitcast<f32>(p.scale);");
        let _ = writeln!(w, "  let qb = (bi * p.n + row) * p.qs + h * {d}u;");
        for c in 0..d4 {
            let b = 4 * c;
            let _ = writeln!(w, "  let q{c} = {} * scale; var o{c} = vec4<f32>(0.0);", vec4("q", &format!("(qb + {b}u)")));
        }
        let _ = writeln!(w, "  var mx = -3.0e38; var l = 0.0;");
        let _ = writeln!(w, "  let kb = bi * p.m * p.ks + h * {d}u;");
        if self.causal {
            let _ = writeln!(w, "  let kend = min(p.m, wid.x * {t}u + {t}u);");
        } else {
            let _ = writeln!(w, "  let kend = p.m;");
        }
        let _ = writeln!(w, "  for (var j0 = 0u; j0 < kend; j0 = j0 + {bc}u) {{");
        let _ = writeln!(w, "    for (var e = t; e < {}u; e = e + {t}u) {{", bc * d4);
        let _ = writeln!(w, "      let j = j0 + e / {d4}u; let c = (e % {d4}u) * 4u; var kv = vec4<f32>(0.0); var vv = vec4<f32>(0.0);");
        let _ = writeln!(w, "      if (j < p.m) {{ let a = kb + j * p.ks + c; kv = {}; vv = {}; }}", vec4("k", "a"), vec4("v", "a"));
        let _ = writeln!(w, "      kt[e] = kv; vt[e] = vv;");
        let _ = writeln!(w, "    }}");
        let _ = writeln!(w, "    workgroupBarrier();");
        let _ = writeln!(w, "    for (var jj = 0u; jj < {bc}u; jj = jj + 1u) {{");
        let _ = writeln!(w, "      let j = j0 + jj; let kr = jj * {d4}u;");
        let _ = write!(w, "      var acc = vec4<f32>(0.0);");
        for c in 0..d4 {
            let _ = write!(w, " acc = fma(q{c}, kt[kr + {c}u], acc);");
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "      let sc = (acc.x + acc.y) + (acc.z + acc.w);");
        let valid = if self.causal { "j < p.m && j <= i" } else { "j < p.m" };
        let _ = writeln!(w, "      if ({valid}) {{");
        let _ = write!(w, "        if (sc > mx) {{ let f = exp(mx - sc); l = l * f;");
        for c in 0..d4 {
            let _ = write!(w, " o{c} = o{c} * f;");
        }
        let _ = writeln!(w, " mx = sc; }}");
        let _ = write!(w, "        let e = exp(sc - mx); l = l + e; let ev = vec4<f32>(e);");
        for c in 0..d4 {
            let _ = write!(w, " o{c} = fma(ev, vt[kr + {c}u], o{c});");
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "      }}");
        let _ = writeln!(w, "    }}");
        let _ = writeln!(w, "    workgroupBarrier();");
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "  if (i < p.n) {{");
        let _ = writeln!(w, "    let ob = (bi * p.n + i) * p.qs + h * {d}u; let r = 1.0 / l;");
        for c in 0..d4 {
            let b = 4 * c;
            let _ = writeln!(
                w,
                "    {{ let y = o{c} * r; o[ob + {b}u] = {}; o[ob + {}u] = {}; o[ob + {}u] = {}; o[ob + {}u] = {}; }}",
                e.store("y.x"),
                b + 1,
                e.store("y.y"),
                b + 2,
                e.store("y.z"),
                b + 3,
                e.store("y.w")
            );
        }
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_blocks_fit_workgroup_memory() {
        for d in [4, 8, 40, 64, 80, 128] {
            let c = FlashConfig { d, causal: false, elem: Elem::F32 };
            let b = c.block();
            assert!(b.is_power_of_two() && b * d * 4 * 2 <= 16384 && b <= 32, "d {d}: block {b}");
            assert!(c.wgsl().contains("@workgroup_size(64)"));
        }
        assert_eq!(FlashConfig { d: 40, causal: false, elem: Elem::F32 }.block(), 32);
        assert_eq!(FlashConfig { d: 128, causal: true, elem: Elem::F16 }.block(), 16);
    }
}
