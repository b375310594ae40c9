//! The one seeded noise source of visii: counter-based (SplitMix64 over `(seed, stream, index)`) and
//! Box-Muller with `libm`, so a seed gives bit-identical noise natively and in wasm. Streams are
//! independent: the learning loop draws step `k`'s noise from stream `k`, so applying can regenerate
//! exactly the noise a given learning step used.

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A reproducible stream of uniform and normal numbers.
#[derive(Clone, Debug)]
pub struct NoiseRng {
    key: u64,
    counter: u64,
}

impl NoiseRng {
    /// Stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self { key: mix(seed ^ mix(stream.wrapping_add(0x9E37_79B9_7F4A_7C15))), counter: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        mix(self.key.wrapping_add(self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// Uniform in (0, 1), never 0.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard normal values (Box-Muller, both outputs used).
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = libm::sqrt(-2.0 * libm::log(u1));
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push((r * libm::cos(a)) as f32);
            out.push((r * libm::sin(a)) as f32);
        }
        out.truncate(n);
        out
    }

    /// A uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_independent_streams() {
        let a = NoiseRng::new(42, 0).normal(1000);
        assert_eq!(a, NoiseRng::new(42, 0).normal(1000));
        assert_ne!(a, NoiseRng::new(42, 1).normal(1000));
        assert_ne!(a, NoiseRng::new(43, 0).normal(1000));
        // Known values pin the generator across platforms and releases.
        // (instruction files record seeds: changing these values breaks noise reuse for old files)
        assert_eq!(NoiseRng::new(0, 0).normal(4), vec![-0.17660189, 1.4621629, -1.602133, 0.20066267]);
        assert_eq!(NoiseRng::new(0, 0).next_u64(), 6235967106033911276);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / 1000.0;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.1, "mean {mean} var {var}");
    }
}
