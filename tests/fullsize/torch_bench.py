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
from make_fullsize import UNET  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, required=True)
    ap.add_argument("--what", choices=["forward", "learn-step", "sample-step"], required=True)
    ap.add_argument("--config", choices=["full", "tiny"], required=True)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
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

    t1 = time.perf_counter()
    once()
    first = time.perf_counter() - t1
    best = first
    for _ in range(a.runs):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"backend": "pytorch", "params": params, "build_s": build_s, "first_s": first, "run_s": best,
                      "device_pool_bytes": None, "peak_rss_bytes": rss, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
