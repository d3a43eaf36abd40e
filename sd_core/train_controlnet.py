"""Trains a small ControlNet for the built-in tiny model: the control image is the target shape's silhouette
(white on black), so the picture puts the shape where the silhouette is, whatever position the prompt names.

    python -m glass_diffusion.sd_core.train_controlnet --out WORK_DIR [--seed 0] [--steps 400] [--threads 1]

The base model (the built-in glass-tiny, or --base CHECKPOINT with --vocab) stays frozen; only the ControlNet
learns, with the ControlNet recipe: the encoder half copied from the base UNet, zero convolutions (and the
last hint conv) starting at zero, the SD eps-prediction loss (min-SNR-5 weighted) through the frozen UNet.

Data (sd_core/toy_data.py scenes, drawn from the seed): the latent of the scene, its silhouette as the control
image, and a caption whose position phrase names a random cell 60 % of the time (the true one 25 %, none 15 %),
so the silhouette has to win over the prompt; 10 % of captions are "" as for classifier-free guidance.
Every random draw depends only on the seed and the step, so the same command gives the same weights
(with the same torch build and thread count).
"""
import argparse
import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import builtin, toy_data
from .checkpoint import load_checkpoint
from .conditioning import encode_prompt
from .controlnet import ControlNet, save_controlnet
from .tokenizer import CLIPTokenizer

HINT_WIDTHS = (8, 16, 32, 32)  # the hint block of the tiny ControlNet (SD's is 16, 32, 96, 256)
P_RANDOM_POSITION, P_TRUE_POSITION = 0.60, 0.25  # else the caption names no position


def silhouette(scene: toy_data.Scene, resolution: int = 64) -> np.ndarray:
    """The scene's shape as float32 [H, W] in 0..1 (white shape, black background, anti-aliased edges)."""
    img = toy_data.draw(replace(scene, colour="white", background="black"), resolution)[..., 0].astype(np.float32)
    lo, hi = toy_data.COLOURS["black"][0], toy_data.COLOURS["white"][0]
    return ((img - lo) / (hi - lo)).clip(0, 1)


def control_images(scenes, resolution: int = 64) -> torch.Tensor:
    """Silhouettes of scenes as an IMAGE [N, H, W, 3] (0..1)."""
    sil = np.stack([silhouette(s, resolution) for s in scenes])  # (N, H, W)
    return torch.from_numpy(sil).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def training_caption(scene: toy_data.Scene, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < P_RANDOM_POSITION:
        scene = replace(scene, row=int(rng.integers(3)), col=int(rng.integers(3)))
    keep = rng.random(2) >= 0.15  # size and background left out as in the base model's captions
    return scene.caption(say_size=bool(keep[0]), say_position=u < P_RANDOM_POSITION + P_TRUE_POSITION,
                         say_background=bool(keep[1]))


def sd1_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to 10 %


@torch.no_grad()
def encode_pool(model, n: int, seed: int, resolution: int):
    """n scenes: VAE posterior mean and std of each picture, and the scenes."""
    means, stds, scenes = [], [], []
    for i in range(0, n, 256):
        images, _, sc = toy_data.make_batch([seed, 6, i], min(256, n - i), resolution)
        post = model.vae.encode(toy_data.to_tensor(images))
        means.append(post.mean)
        stds.append(post.std)
        scenes += sc
    return torch.cat(means), torch.cat(stds), scenes


def train(model, tokenizer, args) -> ControlNet:
    torch.manual_seed(args.seed)
    model.requires_grad_(False)  # the base model stays frozen
    unet, clip = model.unet, model.clip
    net = ControlNet.from_unet(unet, hint_widths=HINT_WIDTHS).float().train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    mean, std, scenes = encode_pool(model, args.pool, args.seed, args.resolution)
    hints = control_images(scenes, args.resolution).movedim(-1, 1)  # (N, 3, H, W), drawn once
    scale = model.config.vae.scaling_factor
    ac = sd1_alphas_cumprod()
    snr = ac / (1 - ac)
    weight = snr.clamp(max=5.0) / snr  # min-SNR-5 weighting for eps prediction
    text_cache = {}

    def context(captions):
        for c in set(captions) - set(text_cache):
            text_cache[c] = encode_prompt(clip, tokenizer, c)[0][0][0]  # (77, D)
        return torch.stack([text_cache[c] for c in captions])  # (B, 77, D)

    t0, log = time.time(), []
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, 7, step])
        idx = rng.integers(len(scenes), size=args.batch)
        captions = [training_caption(scenes[i], rng) if u >= 0.1 else ""
                    for i, u in zip(idx, rng.random(args.batch))]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        ii = torch.from_numpy(idx)
        hint = hints[ii]  # (B, 3, H, W)
        x0 = (mean[ii] + std[ii] * torch.randn(mean[ii].shape, generator=gen)) * scale  # (B, 4, h, w)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ctx = context(captions)
        residuals = net(xt, hint, t.float(), ctx)
        pred = unet(xt, t.float(), ctx, control=residuals)
        loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {np.mean(log[-25:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
    return net.eval().requires_grad_(False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the exported ControlNet")
    p.add_argument("--base", type=Path, default=None, help="base checkpoint (default: the built-in glass-tiny)")
    p.add_argument("--vocab", type=Path, default=None, help="its CLIP vocabulary (default: the built-in one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--pool", type=int, default=4096, help="scenes encoded once by the frozen VAE")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--name", default="glass-tiny-silhouette-controlnet.safetensors")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = args.base or builtin.CHECKPOINT
    model = load_checkpoint(base, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer(args.vocab or builtin.VOCABULARY)
    t0 = time.time()
    net = train(model, tokenizer, args)
    seconds = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_controlnet(net, args.out / args.name, dtype=torch.float16, overwrite=True, metadata={
        "glass_diffusion.base_model": Path(base).name, "glass_diffusion.control": "silhouette",
        "glass_diffusion.base_sha256": hashlib.sha256(Path(base).read_bytes()).hexdigest(),
        "glass_diffusion.train_args": json.dumps({k: str(v) for k, v in vars(args).items()})})
    (args.out / "train_info.json").write_text(json.dumps({"seconds": seconds, "args": {k: str(v) for k, v in
                                                                                      vars(args).items()}}, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) after {seconds} s")
    return path


if __name__ == "__main__":
    main()
