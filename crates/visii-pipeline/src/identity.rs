//! Which base model an instruction belongs to. A learned instruction is a point in one text
//! encoder's output space, read by one UNet: applied with another model it means nothing. The
//! identity has two parts:
//! - `arch`: a hash of the UNet and text-encoder configs as parsed (every field that shapes the
//!   computation; naming variants and file layout do not change it);
//! - `signature`: for a few tensors of the UNet and the text encoder, the RMS of their first
//!   `PROBE` values and the projection of those values on a fixed pseudo-random ±1 pattern
//!   (normalised, so ~N(0, 1) between unrelated weights). It survives f32 / f16 / bf16 / int8 storage of the same checkpoint and
//!   separates different checkpoints of the same architecture.
//! `fingerprint` is a short display string: arch hash + a hash of the coarsely rounded signature.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apply::Ip2p;
use crate::error::Result;
use crate::rng::NoiseRng;

/// Values per signed tensor projection (the first `PROBE` values of the flattened tensor).
pub const PROBE: usize = 4096;
const PATTERN_STREAM: u64 = 9 << 32;
/// Relative tolerance on RMS and absolute tolerance on projections when comparing signatures.
pub const RMS_TOL: f32 = 0.02;
pub const PROJ_TOL: f32 = 0.1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// A human name (checkpoint id or folder name).
    pub name: String,
    /// sha256 of the canonical UNet + text-encoder configs (16 hex digits).
    pub arch: String,
    /// [rms, projection] per signed tensor, in a fixed order.
    pub signature: Vec<f32>,
}

/// sha256 of `parts` (each length-prefixed), as 16 hex digits.
pub fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn pattern(n: usize) -> Vec<f32> {
    let mut rng = NoiseRng::new(0x5eed, PATTERN_STREAM);
    (0..n).map(|_| if rng.below(2) == 0 { -1.0 } else { 1.0 }).collect()
}

/// [rms, projection on the pattern / norm] of the first PROBE values of a tensor,
/// as a [2] tensor (read back together with the others).
fn stats<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n: usize = t.dims().iter().product();
    let k = n.min(PROBE);
    let head = t.reshape([n]).slice([0..k]);
    let rms = head.clone().powi_scalar(2).mean().sqrt();
    let pat = Tensor::<1>::from_data(TensorData::new(pattern(k), [k]), &head.device());
    let norm = head.clone().powi_scalar(2).sum().sqrt().clamp_min(1e-20);
    let proj = (head * pat).sum().div(norm);
    Tensor::cat(vec![rms, proj], 0)
}

impl ModelIdentity {
    /// The identity of a loaded model (one small readback).
    pub fn of(model: &Ip2p) -> Result<Self> {
        crate::block_on(Self::of_async(model))
    }

    /// `of` without a blocking readback (the browser).
    pub async fn of_async(model: &Ip2p) -> Result<Self> {
        let u = &model.unet;
        let t = &model.text;
        let parts = vec![
            stats(u.conv_in.weight.val()),
            stats(u.conv_out.weight.val()),
            stats(u.time_linear_1.weight.val()),
            stats(t.token_embedding[0].val()),
            stats(t.position_embedding.val()),
            stats(t.layers.last().map(|l| l.mlp.fc2.weight.val()).unwrap_or_else(|| t.final_layer_norm.gamma.val().unsqueeze())),
        ];
        let signature = crate::read_f32(Tensor::cat(parts, 0)).await?;
        Ok(Self { name: model.name.clone(), arch: model.arch.clone(), signature })
    }

    /// Short display form, e.g. `3f2a…:9c41…`.
    pub fn fingerprint(&self) -> String {
        let rounded: Vec<String> = self.signature.chunks(2).map(|c| format!("{:.1e}/{:.0}", c[0], c.get(1).copied().unwrap_or(0.0) * 2.0)).collect();
        let sig = short_hash(&[rounded.join(",").as_bytes()]);
        format!("{}-{}", &self.arch[..self.arch.len().min(8)], &sig[..8])
    }

    /// Whether `other` is the same base model (architecture equal, signature within tolerance).
    pub fn matches(&self, other: &ModelIdentity) -> bool {
        self.arch == other.arch
            && self.signature.len() == other.signature.len()
            && self
                .signature
                .chunks(2)
                .zip(other.signature.chunks(2))
                .all(|(a, b)| (a[0] - b[0]).abs() <= RMS_TOL * a[0].abs().max(b[0].abs()) && (a[1] - b[1]).abs() <= PROJ_TOL)
    }

    /// How a person names it in a message.
    pub fn describe(&self) -> String {
        format!("\"{}\" (fingerprint {})", self.name, self.fingerprint())
    }
}
