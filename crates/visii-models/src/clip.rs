//! CLIP text and vision transformers, mirroring transformers' `CLIPTextModel`, `CLIPVisionModel` and
//! the projections of `CLIPModel` (`modeling_clip.py`). Shapes come from `config.json`.

use crate::nn::LayerNorm;
use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::activation::sigmoid;
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::nn::{attention, conv2d_padded, layer_norm, linear};
use crate::resident::Layer;
use crate::weights::{Vb, Weights};

pub use visii_formats::config::{ClipConfig, ClipTextConfig, ClipVisionConfig};

fn check_act(act: &str) -> Result<bool> {
    match act {
        "quick_gelu" => Ok(true),
        "gelu" => Ok(false),
        other => Err(ModelError::Unsupported(format!("CLIP hidden_act `{other}` (expected quick_gelu or gelu)"))),
    }
}

/// `CLIPAttention`: q/k/v/out projections with biases.
#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

/// `CLIPMLP`: fc1 -> activation -> fc2.
#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

/// `CLIPEncoderLayer` (pre-norm).
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn load(vb: &Vb, hidden: usize, inter: usize, heads: usize, eps: f64, quick_gelu: bool) -> Result<Self> {
        let a = vb.pp("self_attn");
        Ok(Self {
            self_attn: ClipAttention {
                q_proj: linear(&a.pp("q_proj"), hidden, hidden, true)?,
                k_proj: linear(&a.pp("k_proj"), hidden, hidden, true)?,
                v_proj: linear(&a.pp("v_proj"), hidden, hidden, true)?,
                out_proj: linear(&a.pp("out_proj"), hidden, hidden, true)?,
                heads,
            },
            layer_norm1: layer_norm(&vb.pp("layer_norm1"), hidden, eps)?,
            mlp: ClipMlp {
                fc1: linear(&vb.pp("mlp").pp("fc1"), hidden, inter, true)?,
                fc2: linear(&vb.pp("mlp").pp("fc2"), inter, hidden, true)?,
                quick_gelu,
            },
            layer_norm2: layer_norm(&vb.pp("layer_norm2"), hidden, eps)?,
        })
    }

    fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let h = attention(a.q_proj.run(h.clone()), a.k_proj.run(h.clone()), a.v_proj.run(h), a.heads, causal);
        let x = a.out_proj.run_add(h, x);
        let h = self.mlp.fc1.run(self.layer_norm2.forward(x.clone()));
        let h = if self.mlp.quick_gelu { h.clone() * sigmoid(h.mul_scalar(1.702)) } else { crate::nn::gelu(h) };
        self.mlp.fc2.run_add(h, x)
    }
}

/// An embedding table `[rows, hidden]` as row chunks that each fit half the buffer budget.
fn load_table(vb: &Vb, rows: usize, hidden: usize) -> Result<Vec<Param<Tensor<2>>>> {
    let mut values = vb.values("weight", &[rows, hidden])?;
    let per = ((crate::nn::max_buffer_bytes() / 2) as usize / (hidden * 4).max(1)).clamp(1, rows.max(1));
    // Split from the end, so the host holds the table plus one chunk at most (one chunk: no copy).
    let mut chunks = vec![];
    for start in (0..rows).step_by(per).rev() {
        let c = if start == 0 { std::mem::take(&mut values) } else { values.split_off(start * hidden) };
        let data = TensorData::new(c, [rows.min(start + per) - start, hidden]);
        chunks.push(Param::from_tensor(crate::weights::persistent(vb.device(), data, |d, dev| Tensor::from_data(d, dev))));
    }
    chunks.reverse();
    Ok(chunks)
}

/// The encoder layers, each handed to `w.block` as it is built (int8 on the device if asked),
/// except the last when `last_f32` (the model's identity is read from it).
#[allow(clippy::too_many_arguments)]
fn load_layers(
    w: &Weights,
    vb: &Vb,
    n: usize,
    hidden: usize,
    inter: usize,
    heads: usize,
    eps: f64,
    qg: bool,
    last_f32: bool,
) -> Result<Vec<ClipEncoderLayer>> {
    if heads == 0 || hidden % heads != 0 {
        return Err(ModelError::Unsupported(format!("hidden size {hidden} is not divisible by {heads} heads")));
    }
    (0..n)
        .map(|i| {
            let layer = ClipEncoderLayer::load(&vb.pp("encoder.layers").pp(i), hidden, inter, heads, eps, qg)?;
            Ok(if last_f32 && i + 1 == n { layer } else { w.block(layer) })
        })
        .collect()
}

/// `CLIPTextTransformer`: output = last hidden state after the final layer norm, [b, positions, hidden].
#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    /// The token-embedding table in row chunks, each within the buffer budget
    /// ([`crate::nn::max_buffer_bytes`]): CLIP ViT-L/14's is 152 MB in f32, over WebGPU's default
    /// 128 MiB binding limit.
    pub token_embedding: Vec<Param<Tensor<2>>>,
    pub position_embedding: Param<Tensor<2>>,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

impl ClipTextTransformer {
    /// Load from weights whose names start with `text_model.` (2023 checkpoints, `CLIPModel`) or
    /// carry no prefix (transformers 5 `CLIPTextModel`): both are accepted.
    pub fn load(w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        let qg = check_act(&cfg.hidden_act)?;
        let vb = w.root().pp("text_model");
        let e = vb.pp("embeddings");
        Ok(Self {
            token_embedding: load_table(&e.pp("token_embedding"), cfg.vocab_size, cfg.hidden_size)?,
            position_embedding: Param::from_tensor(e.pp("position_embedding").get("weight", [cfg.max_position_embeddings, cfg.hidden_size])?),
            layers: load_layers(
                w,
                &vb,
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                qg,
                true,
            )?,
            final_layer_norm: layer_norm(&vb.pp("final_layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?,
        })
    }

    /// Token ids [b, n] (n <= max positions) -> hidden states [b, n, hidden].
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward_embeds(self.embed(ids))
    }

    /// Token ids [b, n] -> token embeddings [b, n, hidden] (no positions). With a chunked table
    /// each chunk gathers its own ids (others masked to zero) and the parts are summed: exact, and
    /// no readback of the ids.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        if self.token_embedding.len() == 1 {
            return embedding(self.token_embedding[0].val(), ids);
        }
        let mut lo = 0i64;
        let mut out: Option<Tensor<3>> = None;
        for chunk in &self.token_embedding {
            let t = chunk.val();
            let rows = t.dims()[0] as i64;
            let inside = ids.clone().greater_equal_elem(lo).bool_and(ids.clone().lower_elem(lo + rows));
            let local = ids.clone().sub_scalar(lo).clamp(0, rows - 1);
            let part = embedding(t, local) * inside.float().unsqueeze_dim::<3>(2);
            out = Some(match out {
                Some(o) => o + part,
                None => part,
            });
            lo += rows;
        }
        out.expect("at least one chunk")
    }

    /// Rows in the token-embedding table.
    pub fn vocab_rows(&self) -> usize {
        self.token_embedding.iter().map(|c| c.val().dims()[0]).sum()
    }

    /// The encoder's output at the last position of `prefix ++ [v]` for every candidate `v` of
    /// `candidates` [b] (ids), [b, hidden]: what [`forward`](Self::forward) gives there, with the
    /// prefix computed once (its keys and values per layer are shared by every candidate; the
    /// encoder is causal, so nothing after the candidate matters). `prefix` is at least one id (BOS).
    pub fn forward_last_after(&self, prefix: &[i64], candidates: Tensor<1, Int>) -> Tensor<2> {
        let device = candidates.device();
        let p = prefix.len();
        let [b] = candidates.dims();
        let hidden = self.position_embedding.val().dims()[1];
        // The prefix, causally, keeping each layer's keys and values.
        let ids = Tensor::<2, Int>::from_data(TensorData::new(prefix.to_vec(), [1, p]), &device);
        let mut x = self.embed(ids) + self.position_embedding.val().slice([0..p]).unsqueeze::<3>();
        let mut kv = vec![];
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(x.clone());
            let a = &layer.self_attn;
            kv.push((a.k_proj.run(h.clone()), a.v_proj.run(h)));
            x = layer.forward(x, true);
        }
        // Each candidate as the next token: its query attends to the prefix and to itself.
        let pos = self.position_embedding.val().slice([p..p + 1]).unsqueeze::<3>();
        let mut x = self.embed(candidates.reshape([b, 1])) + pos;
        for (layer, (k_pre, v_pre)) in self.layers.iter().zip(kv) {
            let a = &layer.self_attn;
            let (heads, d) = (a.heads, hidden / a.heads);
            let h = layer.layer_norm1.forward(x.clone());
            // [b, positions, heads, d]; one query per candidate, so products and sums, not
            // batches of one-row matrix products (which GEMM kernels run poorly).
            let split = |t: Tensor<3>, n: usize| t.reshape([b, n, heads, d]);
            let q = split(a.q_proj.run(h.clone()), 1);
            let k = Tensor::cat(vec![k_pre.expand([b, p, hidden]), a.k_proj.run(h.clone())], 1);
            let v = Tensor::cat(vec![v_pre.expand([b, p, hidden]), a.v_proj.run(h)], 1);
            let scores = (split(k, p + 1) * q).sum_dim(3).div_scalar((d as f64).sqrt()); // [b, p + 1, heads, 1]
            let weights = burn::tensor::activation::softmax(scores, 1);
            let o = (split(v, p + 1) * weights).sum_dim(1); // [b, 1, heads, d]
            x = a.out_proj.run_add(o.reshape([b, 1, hidden]), x);
            let h = layer.mlp.fc1.run(layer.layer_norm2.forward(x.clone()));
            let h = if layer.mlp.quick_gelu { h.clone() * sigmoid(h.mul_scalar(1.702)) } else { crate::nn::gelu(h) };
            x = layer.mlp.fc2.run_add(h, x);
        }
        self.final_layer_norm.forward(x).reshape([b, hidden])
    }

    /// Token embeddings [b, n, hidden] (n <= max positions) -> hidden states [b, n, hidden]. Used
    /// by prompt search, which differentiates through the encoder with respect to its inputs.
    pub fn forward_embeds(&self, tokens: Tensor<3>) -> Tensor<3> {
        let [_, n, _] = tokens.dims();
        let pos = self.position_embedding.val().slice([0..n]).unsqueeze::<3>();
        let mut x = tokens + pos;
        for layer in &self.layers {
            x = layer.forward(x, true);
        }
        self.final_layer_norm.forward(x)
    }
}

/// `CLIPVisionTransformer` + `visual_projection`: pixel values -> pooled output and image embeddings.
#[derive(Module, Debug)]
pub struct ClipVision {
    pub class_embedding: Param<Tensor<1>>,
    pub patch_embedding: Conv2d,
    pub position_embedding: Param<Tensor<2>>,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub visual_projection: Linear,
}

impl ClipVision {
    /// Load `vision_model.*` and `visual_projection` (a `CLIPModel` or `CLIPVisionModelWithProjection` file).
    pub fn load(w: &Weights, cfg: &ClipVisionConfig, projection_dim: usize) -> Result<Self> {
        let qg = check_act(&cfg.hidden_act)?;
        let h = cfg.hidden_size;
        let vb = w.root().pp("vision_model");
        let e = vb.pp("embeddings");
        let grid = cfg.image_size / cfg.patch_size;
        Ok(Self {
            class_embedding: Param::from_tensor(e.get("class_embedding", [h])?),
            patch_embedding: conv2d_padded(
                &e.pp("patch_embedding"),
                cfg.num_channels,
                h,
                cfg.patch_size,
                cfg.patch_size,
                PaddingConfig2d::Valid,
                false,
            )?,
            position_embedding: Param::from_tensor(e.pp("position_embedding").get("weight", [grid * grid + 1, h])?),
            pre_layrnorm: layer_norm(&vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            layers: load_layers(w, &vb, cfg.num_hidden_layers, h, cfg.intermediate_size, cfg.num_attention_heads, cfg.layer_norm_eps, qg, false)?,
            post_layernorm: layer_norm(&vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            visual_projection: w.block(linear(&w.root().pp("visual_projection"), h, projection_dim, false)?),
        })
    }

    /// Pixel values [b, 3, S, S] -> pooled output [b, hidden] (post-layer-norm of the class token).
    pub fn pooled(&self, pixels: Tensor<4>) -> Tensor<2> {
        let p = self.patch_embedding.run(pixels);
        let [b, c, gh, gw] = p.dims();
        let p = p.reshape([b, c, gh * gw]).swap_dims(1, 2);
        let cls = self.class_embedding.val().reshape([1, 1, c]).expand([b, 1, c]);
        let mut x = Tensor::cat(vec![cls, p], 1) + self.position_embedding.val().unsqueeze::<3>();
        x = self.pre_layrnorm.forward(x);
        for layer in &self.layers {
            x = layer.forward(x, false);
        }
        let first = x.slice([0..b, 0..1, 0..c]).reshape([b, c]);
        self.post_layernorm.forward(first)
    }

    /// Pixel values -> image embeddings [b, projection_dim] (`get_image_features`).
    pub fn image_embeds(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.visual_projection.run(self.pooled(pixels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dicts_of_transformers_4_win_over_the_sub_configs() {
        // openai/clip-vit-large-patch14's config.json carries both; a `_dict` alone (text_config null)
        // also occurs. Fields the `_dict` omits take transformers' defaults.
        let both = r#"{"projection_dim": 768,
            "text_config": {"hidden_size": 512, "intermediate_size": 2048, "max_position_embeddings": 77},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768},
            "vision_config": {"hidden_size": 1024, "patch_size": 14, "num_hidden_layers": 24},
            "vision_config_dict": null}"#;
        let c: ClipConfig = serde_json::from_str(both).unwrap();
        assert_eq!((c.text_config.hidden_size, c.text_config.intermediate_size, c.text_config.num_attention_heads), (768, 3072, 12));
        assert_eq!(c.text_config.vocab_size, 49408);
        assert_eq!((c.vision_config.hidden_size, c.vision_config.patch_size, c.vision_config.num_hidden_layers), (1024, 14, 24));
        let dict_only: ClipConfig = serde_json::from_str(r#"{"text_config": null, "vision_config_dict": {"hidden_size": 1024}}"#).unwrap();
        assert_eq!((dict_only.text_config.hidden_size, dict_only.vision_config.hidden_size), (512, 1024));
        assert_eq!(dict_only.projection_dim, None);
    }
}
