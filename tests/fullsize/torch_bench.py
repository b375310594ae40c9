"""The PyTorch peer of `visii bench`: the same UNet config with random weights, on the CPU, timed the
same way (first run, then the best of `--runs`). Prints one JSON line with the keys `visii
bench-one` prints. Run by `visii bench --torch` (and `./build.sh bench`).

    python3 tests/fullsize/torch_bench.py --latent 32 --what forward --config full --runs 1
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

FIX = Path(__file__).resolve().parent.parent / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fullsize import UNET, VAE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, required=True)
    ap.add_argument("--what", choices=["forward", "learn-step", "sample-step", "vae-decode", "vae-encode"], required=True)
    ap.add_argument("--config", choices=["full", "tiny"], required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    torch.set_default_device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if a.what.startswith("vae"):
        vae_bench(a, dev, sync)
        return
    if a.config == "full":
        unet = UNet2DConditionModel(**UNET)
    else:
        unet = UNet2DConditionModel.from_config(json.loads((FIX / "tiny-ip2p/unet/config.json").read_text()))
    unet.eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    cfg = unet.config
    lc, ic, hidden, n = cfg.out_channels, cfg.in_channels - cfg.out_channels, cfg.cross_attention_dim, a.latent
    normal = lambda *s: torch.randn(*s)
    c = torch.randn(1, 77, hidden, requires_grad=True)
    opt = torch.optim.AdamW([c], lr=1e-3)
    z_after, z_before = normal(1, lc, n, n), normal(1, ic, n, n)

    def once():
        if a.what == "forward":
            with torch.no_grad():
                unet(normal(1, cfg.in_channels, n, n), 500, encoder_hidden_states=normal(1, 77, hidden)).sample.sum().item()
        elif a.what == "sample-step":
            with torch.no_grad():
                x = normal(1, lc, n, n)
                e = unet(torch.cat([x.repeat(3, 1, 1, 1), normal(3, ic, n, n)], 1), 500, encoder_hidden_states=normal(3, 77, hidden)).sample
                g = e[2:3] + 7.5 * (e[0:1] - e[1:2]) + 1.5 * (e[1:2] - e[2:3])
                (x + g).sum().item()
        else:
            # As ours: rows B (image only) and C (unconditional) without a graph, row A (text +
            # image) forward and backward to the instruction, then an AdamW step.
            noisy = z_after + normal(1, lc, n, n)
            inp = torch.cat([noisy, z_before], 1)
            with torch.no_grad():
                unet(inp.repeat(2, 1, 1, 1), 500, encoder_hidden_states=normal(2, 77, hidden)).sample
            e = unet(inp, 500, encoder_hidden_states=c).sample
            loss = (e - normal(1, lc, n, n)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    report(a, dev, sync, unet, build_s, once)


def report(a, dev, sync, model, build_s, once) -> None:
    """Time `once` as `visii bench-one` does (first run, then the best of --runs) and print its JSON line."""
    sync()
    t1 = time.perf_counter()
    once()
    sync()
    first = time.perf_counter() - t1
    best = first
    for _ in range(a.runs):
        t = time.perf_counter()
        once()
        sync()
        best = min(best, time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in model.parameters())
    pool = torch.cuda.max_memory_reserved() if dev.type == "cuda" else None
    print(json.dumps({"backend": "pytorch", "params": params, "build_s": build_s, "first_s": first, "run_s": best,
                      "device_pool_bytes": pool, "peak_rss_bytes": rss, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "device": str(dev)}))


def vae_bench(a, dev, sync) -> None:
    from diffusers import AutoencoderKL

    t0 = time.perf_counter()
    if a.config == "full":
        vae = AutoencoderKL(**VAE)
    else:
        vae = AutoencoderKL.from_config(json.loads((FIX / "tiny-ip2p/vae/config.json").read_text()))
    vae.eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    n = a.latent
    px = n * 2 ** (len(vae.config.block_out_channels) - 1)

    def once():
        with torch.no_grad():
            if a.what == "vae-decode":
                vae.decode(torch.randn(1, vae.config.latent_channels, n, n)).sample[0, 0, 0, 0].item()
            else:
                vae.encode(torch.randn(1, 3, px, px)).latent_dist.mode()[0, 0, 0, 0].item()

    report(a, dev, sync, vae, build_s, once)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
