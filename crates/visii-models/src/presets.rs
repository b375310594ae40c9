//! Full-size configs of the real checkpoints, for benchmarks and memory measurements with random
//! weights (the real weights are not downloadable here). Values copied from the published files:
//! `timbrooks/instruct-pix2pix/{unet,vae,text_encoder}/config.json` and
//! `openai/clip-vit-large-patch14/config.json`.

use crate::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig};
use crate::unet::{PerBlock, UNetConfig};
use crate::vae::VaeConfig;

/// `timbrooks/instruct-pix2pix/unet/config.json` (SD1.5 shape, 8 input channels): 859.5 M parameters.
pub fn ip2p_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 8,
        out_channels: 4,
        block_out_channels: vec![320, 640, 1280, 1280],
        layers_per_block: PerBlock::One(2),
        cross_attention_dim: PerBlock::One(768),
        attention_head_dim: PerBlock::One(8),
        norm_num_groups: 32,
        sample_size: Some(64),
        ..UNetConfig::default()
    }
}

/// `timbrooks/instruct-pix2pix/vae/config.json`: 83.7 M parameters.
pub fn ip2p_vae() -> VaeConfig {
    VaeConfig {
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        sample_size: Some(256),
        ..VaeConfig::default()
    }
}

/// CLIP ViT-L/14 (`openai/clip-vit-large-patch14`); its text tower is the IP2P text encoder.
pub fn clip_vit_l14() -> ClipConfig {
    ClipConfig {
        text_config: ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            projection_dim: 768,
            ..ClipTextConfig::default()
        },
        vision_config: ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            projection_dim: 768,
            ..ClipVisionConfig::default()
        },
        projection_dim: Some(768),
    }
}
