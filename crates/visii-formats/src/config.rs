//! The configs of the four networks (`config.json` of diffusers' `UNet2DConditionModel` and
//! `AutoencoderKL`, transformers' `CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig`) and
//! `preprocessor_config.json` are in [`crate::preprocess`]. Each has `validate`: every field a
//! network is built from is checked against the range this implementation handles (list lengths
//! consistent with the block count, divisibility, products that must fit), so a hostile config is
//! refused with a message naming the field before anything is allocated.

use serde::Deserialize;

/// Check helpers: each returns a message naming the field.
/// A config from JSON, the field at fault named when one does not fit (serde's own message names
/// only the value: "invalid type: string \"NaN\", expected f64").
pub fn from_json<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    from_value(value)
}

/// [`from_json`] of an already parsed value.
pub fn from_value<C: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<C, String> {
    // serde reads a struct from an array too (its fields in order): a config is an object.
    if !value.is_object() {
        return Err("not a JSON object of settings".into());
    }
    let e = match C::deserialize(&value) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    // The field whose removal changes the error (to none, or to "missing field" for itself) is the one.
    if let serde_json::Value::Object(map) = &value {
        for key in map.keys() {
            let mut without = map.clone();
            without.remove(key);
            let culprit = match C::deserialize(&serde_json::Value::Object(without)) {
                Ok(_) => true,
                Err(e2) => e2.to_string() == format!("missing field `{key}`"),
            };
            if culprit {
                return Err(format!("field `{}`: {e}", crate::text::printable_short(key, 80)));
            }
        }
    }
    Err(e.to_string())
}

fn range(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), String> {
    if v < lo || v > hi {
        return Err(format!("`{field}` is {v}, expected {lo}..={hi}"));
    }
    Ok(())
}

fn finite(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), String> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(format!("`{field}` is {v}, expected a number in {lo}..={hi}"));
    }
    Ok(())
}

/// A per-block value: a single number, or a list with one entry per block.
fn per_block(field: &str, v: &PerBlock, blocks: usize, lo: usize, hi: usize) -> Result<(), String> {
    match v {
        PerBlock::One(x) => range(field, *x, lo, hi),
        PerBlock::Each(list) => {
            if list.len() != blocks {
                return Err(format!("`{field}` lists {} values for {blocks} blocks", list.len()));
            }
            list.iter().try_for_each(|x| range(field, *x, lo, hi))
        }
    }
}

/// Widths and counts are bounded well above any released checkpoint, far below what would overflow.
pub const MAX_CHANNELS: usize = 1 << 14;
pub const MAX_LAYERS: usize = 128;
pub const MAX_BLOCKS: usize = 8;
/// Most training timesteps a scheduler config may have (Stable Diffusion's have 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// An int or a per-block list (diffusers writes both).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            // Validation keeps lists non-empty; an empty one reads as 0 rather than panicking.
            PerBlock::Each(v) => v.get(i.min(v.len().saturating_sub(1))).copied().unwrap_or(0),
        }
    }
}

/// `UNet2DConditionModel` config (diffusers defaults where a field is absent, as in 2023 configs).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    pub transformer_layers_per_block: PerBlock,
    /// SD1.x writes the number of heads here (a historical misnomer diffusers keeps).
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub use_linear_projection: bool,
    pub only_cross_attention: serde_json::Value,
    pub upcast_attention: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub time_embedding_type: String,
    pub resnet_time_scale_shift: String,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub sample_size: Option<usize>,
    pub center_input_sample: bool,
    pub mid_block_scale_factor: f64,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            only_cross_attention: serde_json::Value::Bool(false),
            upcast_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            time_embedding_type: "positional".into(),
            resnet_time_scale_shift: "default".into(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            sample_size: None,
            center_input_sample: false,
            mid_block_scale_factor: 1.0,
        }
    }
}

impl UNetConfig {
    /// Heads of block `i` (down order): `num_attention_heads`, or `attention_head_dim` as SD1.x means it.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// Width of the time embedding (`block_out_channels[0] * 4`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0).saturating_mul(4)
    }
}

/// `AutoencoderKL` config (diffusers defaults for absent fields).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub sample_size: Option<usize>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            sample_size: None,
        }
    }
}

impl VaeConfig {
    /// Spatial downsampling factor between image and latent (8 for Stable Diffusion VAEs).
    pub fn downscale(&self) -> usize {
        1usize.checked_shl(self.block_out_channels.len().saturating_sub(1) as u32).unwrap_or(0)
    }
}

/// `CLIPTextConfig` (defaults are transformers' own, used when a config omits a field).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

/// `CLIPVisionConfig`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

/// `CLIPConfig` of a `CLIPModel` folder.
#[derive(Debug, Clone, Deserialize, serde::Serialize, Default)]
#[serde(default, from = "RawClipConfig")]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: Option<usize>,
}

/// `config.json` as transformers 4 (2022-2023) wrote it: besides `text_config` / `vision_config`
/// it may carry `text_config_dict` / `vision_config_dict`, which then win: transformers 4 builds the
/// sub-config from the `_dict` (its missing fields at their defaults) and lets every field of that
/// override `text_config`. `null` sub-configs mean the defaults.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawClipConfig {
    text_config: Option<ClipTextConfig>,
    vision_config: Option<ClipVisionConfig>,
    text_config_dict: Option<ClipTextConfig>,
    vision_config_dict: Option<ClipVisionConfig>,
    projection_dim: Option<usize>,
}

impl From<RawClipConfig> for ClipConfig {
    fn from(r: RawClipConfig) -> Self {
        Self {
            text_config: r.text_config_dict.or(r.text_config).unwrap_or_default(),
            vision_config: r.vision_config_dict.or(r.vision_config).unwrap_or_default(),
            projection_dim: r.projection_dim,
        }
    }
}

/// The block lists shared by the UNet and the VAE: as many block types (of the supported kinds)
/// as block widths, every width in range and divisible by the norm's group count.
fn check_blocks(
    channels: &[usize],
    max_blocks: usize,
    down: &[String],
    up: &[String],
    down_ok: &[&str],
    up_ok: &[&str],
    groups: usize,
) -> Result<(), String> {
    let n = channels.len();
    range("block_out_channels (its length)", n, 1, max_blocks)?;
    if down.len() != n || up.len() != n {
        return Err(format!(
            "`down_block_types` ({}), `up_block_types` ({}) and `block_out_channels` ({n}) must have the same length",
            down.len(),
            up.len()
        ));
    }
    for (field, types, ok) in [("down_block_types", down, down_ok), ("up_block_types", up, up_ok)] {
        if let Some(t) = types.iter().find(|t| !ok.contains(&t.as_str())) {
            return Err(format!("`{field}`: block type {t:?} is not supported ({})", ok.join(", ")));
        }
    }
    for &c in channels {
        range("block_out_channels", c, 1, MAX_CHANNELS)?;
    }
    range("norm_num_groups", groups, 1, MAX_CHANNELS)?;
    if let Some(c) = channels.iter().find(|&&c| c % groups != 0) {
        return Err(format!("`norm_num_groups` {groups} does not divide the block width {c}"));
    }
    Ok(())
}

impl UNetConfig {
    /// Reject configs outside what this implementation mirrors, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        check_blocks(
            &self.block_out_channels,
            MAX_BLOCKS,
            &self.down_block_types,
            &self.up_block_types,
            &["CrossAttnDownBlock2D", "DownBlock2D"],
            &["CrossAttnUpBlock2D", "UpBlock2D"],
            self.norm_num_groups,
        )?;
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(format!("`mid_block_type` {m:?} is not supported (UNetMidBlock2DCrossAttn)"));
            }
        }
        if self.class_embed_type.is_some() || self.addition_embed_type.is_some() {
            return Err("`class_embed_type` / `addition_embed_type` (SDXL-style conditioning) are not supported".into());
        }
        if self.time_embedding_type != "positional" || self.resnet_time_scale_shift != "default" {
            return Err(format!(
                "`time_embedding_type` {:?} / `resnet_time_scale_shift` {:?} are not supported (positional / default)",
                self.time_embedding_type, self.resnet_time_scale_shift
            ));
        }
        if self.only_cross_attention != serde_json::Value::Bool(false) {
            return Err("`only_cross_attention` is not supported".into());
        }
        range("in_channels", self.in_channels, 1, 64)?;
        range("out_channels", self.out_channels, 1, 64)?;
        finite("norm_eps", self.norm_eps, 0.0, 1.0)?;
        finite("freq_shift", self.freq_shift, -1e6, 1e6)?;
        finite("mid_block_scale_factor", self.mid_block_scale_factor, -1e6, 1e6)?;
        per_block("layers_per_block", &self.layers_per_block, n, 1, 16)?;
        per_block("transformer_layers_per_block", &self.transformer_layers_per_block, n, 1, 16)?;
        per_block("cross_attention_dim", &self.cross_attention_dim, n, 1, MAX_CHANNELS)?;
        per_block("attention_head_dim", &self.attention_head_dim, n, 1, MAX_CHANNELS)?;
        if let Some(h) = &self.num_attention_heads {
            per_block("num_attention_heads", h, n, 1, MAX_CHANNELS)?;
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if c % heads != 0 {
                let field = if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" };
                return Err(format!("`{field}`: {heads} heads do not divide block {i}'s width {c}"));
            }
        }
        range("downsample_padding", self.downsample_padding, 0, 4)?;
        for (field, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            range(field, k, 1, 7)?;
            if k % 2 == 0 {
                return Err(format!("`{field}` {k} is even (only odd kernels keep the size)"));
            }
        }
        if let Some(s) = self.sample_size {
            range("sample_size", s, 1, 1024)?;
        }
        Ok(())
    }
}

impl VaeConfig {
    /// Reject configs outside what this implementation mirrors, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check_blocks(
            &self.block_out_channels,
            6,
            &self.down_block_types,
            &self.up_block_types,
            &["DownEncoderBlock2D"],
            &["UpDecoderBlock2D"],
            self.norm_num_groups,
        )?;
        range("in_channels", self.in_channels, 1, 16)?;
        range("out_channels", self.out_channels, 1, 16)?;
        range("latent_channels", self.latent_channels, 1, 64)?;
        range("layers_per_block", self.layers_per_block, 1, 16)?;
        finite("scaling_factor", self.scaling_factor, 1e-6, 1e6)?;
        if let Some(s) = self.sample_size {
            range("sample_size", s, 1, 8192)?;
        }
        Ok(())
    }
}

fn check_transformer(hidden: usize, intermediate: usize, layers: usize, heads: usize, eps: f64, act: &str) -> Result<(), String> {
    range("hidden_size", hidden, 1, MAX_CHANNELS)?;
    range("intermediate_size", intermediate, 1, 4 * MAX_CHANNELS)?;
    range("num_hidden_layers", layers, 1, MAX_LAYERS)?;
    range("num_attention_heads", heads, 1, hidden)?;
    if hidden % heads != 0 {
        return Err(format!("`num_attention_heads` {heads} does not divide `hidden_size` {hidden}"));
    }
    finite("layer_norm_eps", eps, 0.0, 1.0)?;
    if act != "quick_gelu" && act != "gelu" {
        return Err(format!("`hidden_act` {act:?} is not supported (quick_gelu, gelu)"));
    }
    Ok(())
}

impl ClipTextConfig {
    /// Reject configs outside what this implementation mirrors, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check_transformer(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.layer_norm_eps,
            &self.hidden_act,
        )?;
        range("vocab_size", self.vocab_size, 1, 1 << 20)?;
        range("max_position_embeddings", self.max_position_embeddings, 2, 4096)?;
        range("projection_dim", self.projection_dim, 1, MAX_CHANNELS)
    }
}

impl ClipVisionConfig {
    /// Reject configs outside what this implementation mirrors, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check_transformer(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.layer_norm_eps,
            &self.hidden_act,
        )?;
        range("num_channels", self.num_channels, 1, 4)?;
        range("image_size", self.image_size, 1, 4096)?;
        range("patch_size", self.patch_size, 1, self.image_size)?;
        range("projection_dim", self.projection_dim, 1, MAX_CHANNELS)
    }
}

impl ClipConfig {
    /// Both towers and the projection, naming the sub-config.
    pub fn validate(&self) -> Result<(), String> {
        self.text_config.validate().map_err(|e| format!("text_config: {e}"))?;
        self.vision_config.validate().map_err(|e| format!("vision_config: {e}"))?;
        if let Some(p) = self.projection_dim {
            range("projection_dim", p, 1, MAX_CHANNELS)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            beta_start: f64,
            block_out_channels: Vec<usize>,
            #[serde(default)]
            name: String,
        }
        let e = from_json::<C>(r#"{"beta_start": "NaN", "block_out_channels": [1]}"#).unwrap_err();
        assert!(e.starts_with("field `beta_start`:") && e.contains("NaN"), "{e}");
        let e = from_json::<C>(r#"{"beta_start": 0.1, "block_out_channels": [32, 48, -48], "name": "x"}"#).unwrap_err();
        assert!(e.starts_with("field `block_out_channels`:") && e.contains("-48"), "{e}");
        let e = from_json::<C>(r#"{"beta_start": 0.1}"#).unwrap_err();
        assert!(e.contains("missing field `block_out_channels`"), "{e}");
        assert!(from_json::<C>("[1]").is_err() && from_json::<C>("{").is_err());
        assert_eq!(from_json::<C>(r#"{"beta_start": 0.5, "block_out_channels": []}"#).unwrap().beta_start, 0.5);
    }
}
