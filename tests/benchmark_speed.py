"""Speed benchmark: our networks against diffusers' on the same weights, in the same run.

    python tests/benchmark_speed.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--res 512] [--batch 2] [--iters 5]

Builds a full-size SD 1.5 model with seeded random weights, converts the same tensors into diffusers'
UNet2DConditionModel and AutoencoderKL through diffusers' own single-file converters, then times
(median of --iters after a warm-up) one guided UNet step (batch 2 = cond + uncond) and one VAE decode
for both, and prints the ratios. It is a script, not a test: speed is never asserted. Not collected by
pytest (the file name does not start with test_).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parity_util import build_random, diffusers_unet, diffusers_vae, fullsize_lock, v1_inference_config  # noqa: E402

from glass_diffusion.sd_core.model import SDConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, iters: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default 512 on cuda, 256 on cpu)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one guided step)")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    res = args.res or (512 if device.type == "cuda" else 256)
    h = res // 8

    with fullsize_lock():
        ours = build_random(SDConfig.sd15(), seed=0)
        ckpt = {k: v for k, v in ours.state_dict().items()}
        ref_unet = diffusers_unet(ckpt, v1_inference_config()).to(device, dtype)
        ref_vae = diffusers_vae(ckpt, v1_inference_config()).to(device, dtype)
        del ckpt
        ours = ours.to(device, dtype)

        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 4, h, h, generator=g).to(device, dtype)
        t = torch.full((args.batch,), 500.0, device=device)
        ctx = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)
        z = torch.randn(1, 4, h, h, generator=g).to(device, dtype)

        rows = [
            ("UNet forward", lambda: ours.unet(x, t, ctx), lambda: ref_unet(x, t, encoder_hidden_states=ctx).sample),
            ("VAE decode", lambda: ours.vae.decode(z), lambda: ref_vae.decode(z).sample),
        ]
        print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"{dtype}, {res}x{res} px, UNet batch {args.batch}, torch {torch.__version__}, "
              f"median of {args.iters}")
        print(f"{'work':<14}{'ours ms':>10}{'diffusers ms':>14}{'ours/diffusers':>16}")
        for name, fa, fb in rows:
            a, b = timed(fa, args.iters, device), timed(fb, args.iters, device)
            print(f"{name:<14}{a:>10.1f}{b:>14.1f}{a / b:>16.3f}")


if __name__ == "__main__":
    main()
