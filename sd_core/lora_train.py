"""Train a small LoRA for the built-in glass-tiny that teaches it a shape word its grammar lacks.

glass-tiny knows three shapes (sd_core/toy_data.py). This trains a kohya-format LoRA (UNet attention, feed-forward
and 3x3 convolutions, CLIP attention and MLP) on procedural scenes with a new shape, `bar` (a flat
horizontal bar, three times as wide as it is tall), mixed with ordinary scenes so the rest of the grammar is
kept. "bar" is not in the built-in vocabulary: the byte-level BPE splits it into known pieces, which the
LoRA'd text encoder learns to read. (A new colour cannot be taught by a UNet/CLIP LoRA: glass-tiny's VAE,
trained on eight colours, turns any other colour into the nearest of them.)

    python -m glass_diffusion.sd_core.lora_train --out glass-tiny-bar.safetensors [--seed 0] [--steps 400]

(the shipped glass-tiny-bar is `--seed 0 --steps 500`).

Everything is drawn from the seed and runs on one CPU thread, so a run is reproducible bit for bit. The
file is saved in kohya's format (`lora_unet_*` / `lora_te_*`, `.lora_up/.lora_down/.alpha`) in fp16, and
loads in GlassLoraLoader (and ComfyUI's LoraLoader, on a ComfyUI-loaded glass-tiny).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import builtin, toy_data
from .checkpoint import load_checkpoint
from .tokenizer import CLIPTokenizer

NEW_WORD = "bar"  # a flat horizontal bar, three times as wide as it is tall
MAX_TOKENS = 77


def draw(scene: toy_data.Scene, resolution: int = 64) -> np.ndarray:
    """toy_data.draw, plus the new shape: the same centre, size, colours and 2x2 supersampling."""
    if scene.shape != NEW_WORD:
        return toy_data.draw(scene, resolution)
    ss = 2
    n = resolution * ss
    cx, cy = (v * ss for v in toy_data.shape_centre(scene, resolution))
    r = toy_data.SIZES[scene.size] * resolution / 64.0 * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5  # pixel centres
    inside = (np.abs(xx - cx) <= 1.5 * r) & (np.abs(yy - cy) <= 0.5 * r)
    img = np.empty((n, n, 3), np.float32)
    img[:] = toy_data.COLOURS[scene.background]
    img[inside] = toy_data.COLOURS[scene.colour]
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # (n, n, 3) -> (H, W, 3)
    return np.round(img).astype(np.uint8)


def new_word_scene(rng: np.random.Generator) -> toy_data.Scene:
    """A random scene whose shape is the new one (any grammar colour, size, position, background)."""
    base = toy_data.random_scene(rng)
    return toy_data.Scene(base.colour, NEW_WORD, base.size, base.row, base.col, base.background, base.dx, base.dy)


def make_data(seed: int, n: int, p_new: float, resolution: int = 64):
    """n scenes: a fraction p_new with the new shape, the rest ordinary grammar scenes."""
    rng = np.random.default_rng([seed, 7])
    scenes = [new_word_scene(rng) if rng.random() < p_new else toy_data.random_scene(rng) for _ in range(n)]
    images = np.stack([draw(s, resolution) for s in scenes])
    return images, scenes


def targets(unet: torch.nn.Module, clip: torch.nn.Module) -> dict:
    """{'unet' | 'clip': [module name]}: the layers a kohya LoCon trains (attention, feed-forward, the
    transformers' 1x1 projections, the res blocks' 3x3 convolutions; CLIP attention and MLP)."""
    out = {"unet": [], "clip": []}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in name:
            out["unet"].append(name)
        elif isinstance(m, torch.nn.Conv2d) and (name.endswith(("proj_in", "proj_out"))
                                                  or (m.kernel_size == (3, 3) and ("in_layers" in name or "out_layers" in name))):
            out["unet"].append(name)
    out["clip"] = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return out


class LowRank(torch.nn.Module):
    """up [out, r(, 1, 1)] @ down [r, in(, kh, kw)], as kohya stores them; up starts at zero."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        out_dim, in_dim, *k = weight.shape
        fan_in = in_dim * math.prod(k)
        self.down = torch.nn.Parameter((torch.rand(rank, in_dim, *k, generator=gen) * 2 - 1) / math.sqrt(fan_in))
        self.up = torch.nn.Parameter(torch.zeros(out_dim, rank, *[1] * len(k)))

    def delta(self, shape) -> torch.Tensor:
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(shape)  # (out, r) @ (r, in*k) -> weight shape


def train(args) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = load_checkpoint(args.base, dtype=torch.float32).eval()
    tok = CLIPTokenizer(args.vocabulary)
    unet, clip, vae = model.unet, model.clip, model.vae
    for p in model.parameters():
        p.requires_grad_(False)
    names = targets(unet, clip)
    gen = torch.Generator().manual_seed(args.seed)
    nets = {"unet": unet, "clip": clip}
    lora = torch.nn.ModuleDict({
        net: torch.nn.ModuleDict({n.replace(".", "/"): LowRank(nets[net].get_submodule(n).weight, args.rank, gen)
                                  for n in names[net]}) for net in names})
    params = list(lora.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    images, scenes = make_data(args.seed, args.num_images, args.p_new)
    with torch.no_grad():
        post = [vae.encode(toy_data.to_tensor(images[i:i + 256])) for i in range(0, len(images), 256)]
    mean, std = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
    scale = model.config.vae.scaling_factor
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0).float()
    snr = ac / (1 - ac)
    weight = snr.clamp(max=5.0) / snr  # min-SNR-gamma weighting, as glass-tiny was trained

    def patched(net):
        return {f"{n}.weight": nets[net].get_submodule(n).weight + low.delta(nets[net].get_submodule(n).weight.shape)
                for n, low in ((k.replace("/", "."), v) for k, v in lora[net].items())}

    def ids(texts):
        out = torch.full((len(texts), MAX_TOKENS), tok.eos_id, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [tok.bos_id] + tok.encode(t)[: MAX_TOKENS - 2] + [tok.eos_id]
            out[i, : len(toks)] = torch.tensor(toks)
        return out

    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, 11, step])
        idx = rng.integers(len(scenes), size=args.batch)
        captions = [toy_data.random_caption(scenes[i], rng) if u >= 0.1 else "" for i, u in
                    zip(idx, rng.random(args.batch), strict=True)]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        ii = torch.from_numpy(idx)
        x0 = (mean[ii] + std[ii] * torch.randn(mean[ii].shape, generator=g)) * scale  # (B, 4, 8, 8)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = torch.func.functional_call(clip, patched("clip"), (ids(captions),), strict=False).z
        pred = torch.func.functional_call(unet, patched("unet"), (xt, t.float(), context), strict=False)
        loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean()
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.0f} s", flush=True)

    tensors = {}
    for net, prefix in (("unet", "lora_unet_"), ("clip", "lora_te_")):
        for key, low in lora[net].items():
            base = prefix + key.replace("/", "_")
            tensors[base + ".lora_up.weight"] = low.up.detach().half().contiguous()
            tensors[base + ".lora_down.weight"] = low.down.detach().half().contiguous()
            tensors[base + ".alpha"] = torch.tensor(float(args.rank)).half()
    base_hash = hashlib.sha256(Path(args.base).read_bytes()).hexdigest()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.rank),
            "ss_base_model_version": "glass-tiny", "glass_diffusion.base_model_sha256": base_hash,
            "glass_diffusion.training": json.dumps({k: str(v) for k, v in vars(args).items()}),
            "glass_diffusion.concept": NEW_WORD}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, {len(tensors) // 3} modules) in {time.time() - t0:.0f} s")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--base", default=str(builtin.CHECKPOINT), help="the glass-tiny checkpoint to train on")
    p.add_argument("--vocabulary", default=str(builtin.VOCABULARY))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--p-new", type=float, default=0.5, help="fraction of training scenes with the new shape")
    p.add_argument("--threads", type=int, default=1, help="torch threads (results are reproducible per count)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
