//! Readable instructions: for each learned token position, the vocabulary entries nearest to it.
//!
//! An instruction is the text encoder's *output* (after its final layer norm), and CLIP's text
//! encoder is causal: the row at position `i` depends on the tokens at positions `0..=i` only. So
//! the words are read greedily, position by position: each candidate token `v` is put after the
//! words read so far (`BOS w1 .. w(i-1) v`), encoded, and scored by the cosine between its output
//! at `i` and the instruction's row `i`. For an instruction that is a caption's own encoding (what
//! learning keeps at learning rate 0) this reads the caption back exactly.
//!
//! Every vocabulary entry is a candidate where that is cheap (the committed tiny models); on a
//! large encoder (CLIP ViT-L/14: 12 layers of width 768) the candidates are the entries whose
//! embedding, placed at that position with the encoder's layers skipped (`LayerNorm(tok[v] +
//! pos[i])`), is nearest to the row. Either way the read-out is a hint of what an instruction does,
//! as hard-prompt read-outs are, not a prompt that reproduces it.

use burn::tensor::{Tensor, TensorData};

use crate::error::{PipelineError, Result};
use visii_models::{ClipTextTransformer, ClipTokenizer};

/// One vocabulary entry near a learned position.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NearWord {
    /// The token's text (`</w>` ending a word shown as a trailing space is dropped).
    pub word: String,
    pub id: u32,
    /// Cosine similarity, -1..1.
    pub score: f32,
}

/// At most this many words per position.
const MAX_K: usize = 20;

/// How much encoding one position's candidates may cost, in layer x width^2 x candidates units
/// (each candidate is one token after the shared prefix: the tiny models score every entry; CLIP
/// ViT-L/14 about 280).
const REFINE_BUDGET: usize = 2_000_000_000;
/// At least this many candidates per position.
const MIN_CANDIDATES: usize = 32;

/// The `k` nearest vocabulary entries of each position in `span` of `rows` ([positions, hidden],
/// row-major), best first.
pub fn nearest_words(
    text: &ClipTextTransformer,
    tokenizer: &ClipTokenizer,
    rows: &[f32],
    positions: usize,
    span: std::ops::Range<usize>,
    k: usize,
) -> Result<Vec<Vec<NearWord>>> {
    crate::block_on(nearest_words_async(text, tokenizer, rows, positions, span, k))
}

/// [`nearest_words`] without blocking readbacks (the browser).
pub async fn nearest_words_async(
    text: &ClipTextTransformer,
    tokenizer: &ClipTokenizer,
    rows: &[f32],
    positions: usize,
    span: std::ops::Range<usize>,
    k: usize,
) -> Result<Vec<Vec<NearWord>>> {
    let hidden = text.final_layer_norm.gamma.val().dims()[0];
    if positions == 0 || rows.len() != positions * hidden {
        return Err(PipelineError::Config(format!("an instruction of {} values for {positions} positions of width {hidden}", rows.len())));
    }
    let k = k.clamp(1, MAX_K);
    let span = span.start.max(1).min(positions)..span.end.min(positions);
    if span.is_empty() {
        return Ok(vec![]);
    }
    let max_pos = text.position_embedding.val().dims()[0];
    if span.end > max_pos {
        return Err(PipelineError::Config(format!("positions up to {} on a text encoder of {max_pos} positions", span.end)));
    }
    let dev = text.final_layer_norm.gamma.val().device();
    let vocab = text.vocab_rows();
    let per_token = text.layers.len().max(1) * hidden * hidden;
    // Candidates per position: all, or the nearest by embedding where encoding all costs too much.
    let most = (REFINE_BUDGET / per_token).max(MIN_CANDIDATES);
    let shortlist = if most >= vocab { None } else { Some(by_embedding(text, rows, span.clone(), most.min(vocab)).await?) };
    // Candidates encoded at once: their keys and values over the prefix (2 x positions x hidden
    // f32 each) within about 32 MiB.
    let bos = tokenizer.encode("")?.first().copied().unwrap_or(0);
    let mut prefix: Vec<i64> = vec![bos as i64];
    let mut out = vec![];
    for (j, i) in span.clone().enumerate() {
        // Position i's row is encoded after the words read so far (positions 1..i).
        prefix.truncate(i);
        while prefix.len() < i {
            prefix.push(bos as i64);
        }
        let limit = (REFINE_BUDGET / per_token).max(MIN_CANDIDATES);
        let per_chunk = ((32usize << 20) / (8 * (i + 1) * hidden)).clamp(16, 16384);
        let candidates: Vec<u32> = match &shortlist {
            None => (0..vocab as u32).collect(),
            Some(lists) => lists[j].iter().take(limit).copied().collect(),
        };
        let target = Tensor::<2>::from_data(TensorData::new(rows[i * hidden..(i + 1) * hidden].to_vec(), [1, hidden]), &dev);
        let target = unit(target);
        let mut best: Vec<(f32, u32)> = vec![];
        let full = candidates.len() > per_chunk;
        for chunk in candidates.chunks(per_chunk) {
            // A short last chunk is padded to the others' size: one set of kernel shapes per
            // position (compiling kernels is most of the time on a software adapter).
            let b = if full { per_chunk } else { chunk.len() };
            let mut ids: Vec<i64> = chunk.iter().map(|&v| v as i64).collect();
            ids.resize(b, ids[0]);
            let ids = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(ids, [b]), &dev);
            let at_i = text.forward_last_after(&prefix, ids);
            let cos = (unit(at_i) * target.clone()).sum_dim(1).reshape([b]);
            let scores = crate::read_f32(cos).await?;
            for (&s, &v) in scores.iter().zip(chunk) {
                keep_top(&mut best, (s, v), k);
            }
        }
        if let Some(&(_, w)) = best.first() {
            prefix.push(w as i64);
        }
        out.push(
            best.into_iter()
                .map(|(score, id)| {
                    let word = tokenizer.id_to_token(id).unwrap_or_default();
                    let word = word.strip_suffix("</w>").unwrap_or(&word).to_string();
                    NearWord { word, id, score }
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Rows scaled to unit length, [n, hidden].
fn unit(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Insert `e` into `list` (best first), keeping `k`; non-finite scores are left out.
fn keep_top(list: &mut Vec<(f32, u32)>, e: (f32, u32), k: usize) {
    if !e.0.is_finite() || (list.len() >= k && e.0 <= list[list.len() - 1].0) {
        return;
    }
    let at = list.partition_point(|x| x.0 >= e.0);
    list.insert(at, e);
    list.truncate(k);
}

/// For each position of `span`, the `k` entries whose embedding at that position, the encoder's
/// layers skipped, is nearest the row: the learned row taken back through the final layer norm's
/// affine part (`(c - beta) / gamma`) against the centred `tok[v] + pos[i]` (both centred: the
/// cosine of what the layer norm normalises).
async fn by_embedding(text: &ClipTextTransformer, rows: &[f32], span: std::ops::Range<usize>, k: usize) -> Result<Vec<Vec<u32>>> {
    let hidden = text.final_layer_norm.gamma.val().dims()[0];
    let n = span.len();
    let dev = &text.final_layer_norm.gamma.val().device();
    let centre = |x: Tensor<2>| {
        let m = x.clone().mean_dim(1);
        x - m
    };
    // The learned rows taken back through the final layer norm's affine part.
    let c = Tensor::<2>::from_data(TensorData::new(rows[span.start * hidden..span.end * hidden].to_vec(), [n, hidden]), dev);
    let ln = &text.final_layer_norm;
    let gamma = ln.gamma.val();
    let safe_gamma = gamma.clone().abs().clamp_min(1e-6) * gamma.sign().clamp_min(0.0).mul_scalar(2.0).sub_scalar(1.0);
    let c = (c - ln.beta.val().unsqueeze::<2>()) / safe_gamma.unsqueeze::<2>();
    let c = unit(centre(c));
    let p = centre(text.position_embedding.val().slice([span.clone()]));
    // Per candidate v and position i: cos = (c_i . t_v + c_i . p_i) / |t_v + p_i| with t, p centred.
    let cp = (c.clone() * p.clone()).sum_dim(1); // [n, 1]
    let pp = p.clone().powi_scalar(2).sum_dim(1); // [n, 1]
    let mut best: Vec<Vec<(f32, u32)>> = vec![vec![]; n];
    let mut offset = 0u32;
    for chunk in &text.token_embedding {
        let t = centre(chunk.val());
        let rows_here = t.dims()[0];
        let num = c.clone().matmul(t.clone().transpose()) + cp.clone();
        let tt = t.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, r]
        let den = (tt + p.clone().matmul(t.transpose()).mul_scalar(2.0) + pp.clone()).clamp_min(1e-12).sqrt();
        let scores = crate::read_f32(num / den).await?;
        for (i, list) in best.iter_mut().enumerate() {
            for (j, &s) in scores[i * rows_here..(i + 1) * rows_here].iter().enumerate() {
                keep_top(list, (s, offset + j as u32), k);
            }
        }
        offset += rows_here as u32;
    }
    Ok(best.into_iter().map(|list| list.into_iter().map(|(_, id)| id).collect()).collect())
}
