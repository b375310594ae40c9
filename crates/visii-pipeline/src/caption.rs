//! Automatic initial caption: a PEZ-style hard-prompt search (Wen et al. 2023) toward the *after*
//! image's CLIP embedding, reusing the networks already loaded: the IP2P text encoder is CLIP
//! ViT-L/14's text tower, and `text_projection` comes with the CLIP vision side.
//!
//! A continuous prompt `P` [n, hidden] is projected each iteration to its nearest vocabulary
//! embeddings (cosine); the CLIP text embedding of `BOS P' EOS` (pooled at EOS, projected) is
//! compared with the target; the gradient taken at `P'` updates `P` (straight-through, AdamW). The
//! best projected prompt seen is kept. The vocabulary is restricted to whole, common, alphabetic
//! words, so the result reads as a list of words (e.g. "snowy mountain painting winter").

use burn::nn::Linear;
use burn::tensor::{Int, Tensor, TensorData};

use crate::apply::Ip2p;
use crate::error::{PipelineError, Result};
use crate::rng::NoiseRng;

const CAPTION_STREAM: u64 = 5 << 32;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CaptionOptions {
    /// Words in the caption.
    pub tokens: usize,
    pub iterations: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Only vocabulary ids below this are candidates (BPE ids grow as words get rarer).
    pub max_vocab_id: u32,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self { tokens: 8, iterations: 150, lr: 0.1, weight_decay: 0.1, seed: 0, max_vocab_id: 20_000 }
    }
}

/// The search's result.
#[derive(Clone, Debug)]
pub struct Caption {
    pub text: String,
    pub ids: Vec<u32>,
    /// Cosine between the caption's CLIP text embedding and the target, for the returned caption
    /// and for the random start.
    pub similarity: f32,
    pub initial_similarity: f32,
    pub iterations_run: usize,
}

/// Candidate ids: whole words (`...</w>`) of at least 3 ASCII lowercase letters, below `max_id`.
pub fn readable_vocab(model: &Ip2p, max_id: u32) -> Vec<u32> {
    let rows = model.text.vocab_rows() as u32;
    (0..max_id.min(rows).min(model.tokenizer.vocab_size() as u32))
        .filter(|&id| {
            model
                .tokenizer
                .id_to_token(id)
                .is_some_and(|t| t.strip_suffix("</w>").is_some_and(|w| w.len() >= 3 && w.bytes().all(|b| b.is_ascii_lowercase())))
        })
        .collect()
}

/// The BOS and EOS token embeddings, [1, 2, hidden] (looked up once per search).
fn end_tokens(model: &Ip2p) -> Tensor<3> {
    let ids = vec![model.tokenizer.bos_id as i64, model.tokenizer.eos_id as i64];
    model.text.embed(Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 2]), &model.device))
}

/// The normalised CLIP text embedding of `BOS tokens EOS` (pooled at EOS), [1, proj]; `ends` from
/// [`end_tokens`].
fn text_embed(model: &Ip2p, text_projection: &Linear, ends: Tensor<3>, tokens: Tensor<2>) -> Tensor<2> {
    let [n, hidden] = tokens.dims();
    let ends = if tokens.is_autodiff() { ends.autodiff() } else { ends };
    let seq = Tensor::cat(vec![ends.clone().slice([0..1, 0..1, 0..hidden]), tokens.unsqueeze::<3>(), ends.slice([0..1, 1..2, 0..hidden])], 1);
    let h = model.text.forward_embeds(seq);
    let pooled = h.slice([0..1, n + 1..n + 2, 0..hidden]).reshape([1, hidden]);
    let e = text_projection.forward(pooled);
    e.clone().div(e.powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12))
}

/// Search a caption whose CLIP text embedding points toward `target` [proj] (normalised inside).
/// `progress(iteration, best_similarity)` returning false stops early.
pub fn auto_caption(
    model: &Ip2p,
    text_projection: &Linear,
    target: Tensor<1>,
    opts: &CaptionOptions,
    progress: &mut dyn FnMut(usize, f32) -> bool,
) -> Result<Caption> {
    crate::block_on(auto_caption_async(model, text_projection, target, opts, progress))
}

/// `auto_caption` without blocking readbacks (the browser).
pub async fn auto_caption_async(
    model: &Ip2p,
    text_projection: &Linear,
    target: Tensor<1>,
    opts: &CaptionOptions,
    progress: &mut dyn FnMut(usize, f32) -> bool,
) -> Result<Caption> {
    let dev = model.device.clone();
    let vocab = readable_vocab(model, opts.max_vocab_id);
    if vocab.is_empty() || opts.tokens == 0 || opts.tokens + 2 > model.tokenizer.max_len {
        return Err(PipelineError::Config("prompt search has no candidate words or an impossible length".into()));
    }
    let v = vocab.len();
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(vocab.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, v]), &dev);
    let table = model.text.embed(ids_t).squeeze_dim::<2>(0); // [v, hidden]
    let table_n = table.clone().div(table.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12)).transpose(); // [hidden, v]
    let proj = target.dims()[0];
    let target = target.clone().div(target.powi_scalar(2).sum().sqrt().clamp_min(1e-12)).reshape([1, proj]);

    let ends = end_tokens(model);
    let n = opts.tokens;
    let mut rng = NoiseRng::new(opts.seed, CAPTION_STREAM);
    let start: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let mut p = table.clone().select(0, Tensor::<1, Int>::from_data(TensorData::new(start, [n]), &dev)); // [n, hidden]
    let (mut m, mut s2) = (p.zeros_like(), p.zeros_like());
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (mut best, mut best_idx, mut initial) = (f32::NEG_INFINITY, vec![0usize; n], f32::NAN);
    let mut run = 0;
    for it in 0..opts.iterations {
        // Project to the nearest candidate words (cosine).
        let pn = p.clone().div(p.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12));
        let idx = pn.matmul(table_n.clone()).argmax(1).reshape([n]); // [n]
        let x = table.clone().select(0, idx.clone()).autodiff().require_grad();
        let e = text_embed(model, text_projection, ends.clone(), x.clone());
        let cos = (e * target.clone().autodiff()).sum();
        let loss = cos.clone().neg().add_scalar(1.0);
        let grads = loss.backward();
        let g = x.grad(&grads).ok_or_else(|| PipelineError::Config("no gradient in prompt search".into()))?;
        // One readback: the similarity and the projected ids.
        let back = crate::read_f32(Tensor::cat(vec![cos.inner().reshape([1]), idx.float()], 0)).await?;
        let sim = back[0];
        if it == 0 {
            initial = sim;
        }
        if sim > best {
            best = sim;
            best_idx = back[1..].iter().map(|&f| f as usize).collect();
        }
        // AdamW on the continuous prompt with the gradient taken at its projection.
        let k = (it + 1) as i32;
        p = p.mul_scalar(1.0 - opts.lr * opts.weight_decay);
        m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        s2 = s2.mul_scalar(b2) + g.powi_scalar(2).mul_scalar(1.0 - b2);
        let denom = s2.clone().sqrt().div_scalar((1.0 - b2.powi(k)).sqrt()).add_scalar(eps);
        p = p - m.clone().div(denom).mul_scalar(opts.lr / (1.0 - b1.powi(k)));
        run = it + 1;
        if !progress(run, best) {
            break;
        }
    }
    if run == 0 {
        return Err(PipelineError::Cancelled);
    }
    let ids: Vec<u32> = best_idx.iter().map(|&i| vocab[i]).collect();
    let words: Vec<String> = ids.iter().filter_map(|&id| model.tokenizer.id_to_token(id).map(|t| t.trim_end_matches("</w>").to_string())).collect();
    Ok(Caption { text: words.join(" "), ids, similarity: best, initial_similarity: initial, iterations_run: run })
}
