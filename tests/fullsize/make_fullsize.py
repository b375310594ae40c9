"""Full-size checkpoints with random weights, in the real published layouts (never committed).

    python3 tests/fullsize/make_fullsize.py OUT_DIR

writes OUT_DIR/ip2p (diffusers InstructPix2Pix folder: unet / vae / text_encoder as fp16
safetensors variants like the hub's, tokenizer and scheduler copied from the tiny fixture, which
carries the real CLIP BPE vocabulary) and OUT_DIR/clip (transformers CLIPModel, ViT-L/14 shape,
fp16). The architectures are built by diffusers / transformers from the configs of
`timbrooks/instruct-pix2pix` and `openai/clip-vit-large-patch14` (values as in
crates/visii-models/src/presets.rs), so tensor names, shapes and parameter counts are the real
ones. Used for real-size memory and speed measurements (tests/fullsize/README.md).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

FIX = Path(__file__).resolve().parent.parent / "fixtures"

# `timbrooks/instruct-pix2pix/unet/config.json` (SD1.5 shape, 8 input channels); torch_bench.py uses it too.
UNET = dict(
    sample_size=64,
    in_channels=8,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

# `timbrooks/instruct-pix2pix/vae/config.json`.
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)


def main(out: Path) -> None:
    torch.manual_seed(0)
    ip2p, clip = out / "ip2p", out / "clip"
    for d in (ip2p, clip):
        d.mkdir(parents=True, exist_ok=True)

    unet = UNet2DConditionModel(**UNET)
    print("unet params", sum(p.numel() for p in unet.parameters()), flush=True)
    unet.half().save_pretrained(ip2p / "unet", variant="fp16")
    del unet

    vae = AutoencoderKL(**VAE)
    print("vae params", sum(p.numel() for p in vae.parameters()), flush=True)
    vae.half().save_pretrained(ip2p / "vae", variant="fp16")
    del vae

    text_cfg = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    print("text params", sum(p.numel() for p in te.parameters()), flush=True)
    te.half().save_pretrained(ip2p / "text_encoder", variant="fp16")
    del te

    shutil.copytree(FIX / "tiny-ip2p" / "tokenizer", ip2p / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(FIX / "tiny-ip2p" / "scheduler", ip2p / "scheduler", dirs_exist_ok=True)
    index = json.loads((FIX / "tiny-ip2p" / "model_index.json").read_text())
    index["_name_or_path"] = "fullsize-random-ip2p"
    (ip2p / "model_index.json").write_text(json.dumps(index, indent=2))

    cfg = CLIPConfig(
        text_config=text_cfg,
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        projection_dim=768,
    )
    model = CLIPModel(cfg)
    print("clip params", sum(p.numel() for p in model.parameters()), flush=True)
    model.half().save_pretrained(clip)
    for f in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIX / "tiny-clip" / f, clip / f)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
