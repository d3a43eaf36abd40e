"""Trains the built-in tiny model ("glass-tiny") from scratch on procedural scenes (sd_core/toy_data.py).

    python -m glass_diffusion.sd_core.train_tiny --out WORK_DIR [--seed 0] [--threads 1]

The shipped model (glass-tiny v2, sd_core/builtin/) is this command with all defaults, --seed 0 and --threads 2:
41 minutes on an otherwise idle 2-core CPU (VAE ~26 min, encoding ~1 min, diffusion ~14 min). Use one thread
on a shared machine (bitwise reproduction needs the same thread count and torch build).

Stages, each resumable (re-run the same command: it continues from WORK_DIR's last saved state):
  1. tokenizer: a CLIP-BPE vocabulary (vocab.json + merges.txt) learnt from the caption grammar's words;
  2. vae: the KL autoencoder on reconstruction (MSE) + a small KL term;
  3. latents: a fixed set of scenes encoded once by the frozen VAE (posterior mean and std);
  4. diffusion: text encoder and UNet together on the SD 1.x eps-prediction loss (discrete schedule,
     1000 steps, scaled-linear betas), 10 % of captions dropped to "" for classifier-free guidance;
  5. export: one SD 1.x-layout single-file checkpoint (EMA weights, fp16) + its vocabulary (glass-tiny-bpe.txt).
Every random draw comes from the seed and the step number, so a run (or a resumed run) is reproducible.
"""
import argparse
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import toy_data
from .clip import CLIPTextConfig, CLIPTextModel
from .checkpoint import save_checkpoint
from .family import SD1
from .model import SDConfig, StableDiffusion
from .tokenizer import CLIPTokenizer, byte_table, vocab_from_merges
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

MAX_TOKENS = 77


# ----------------------------------------------------------------------------- tokenizer vocabulary

def learn_merges(words: List[str]) -> List[Tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, until every word is one symbol (ties: sorted order)."""
    alphabet = byte_table()
    seqs = []
    for w in words:
        syms = [alphabet[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        seqs.append(syms)
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def build_vocabulary(folder: Path) -> Dict[str, int]:
    """Writes vocab.json + merges.txt (CLIP BPE format, OpenAI's id order) for the grammar's words."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(toy_data.grammar_words())
    vocab = vocab_from_merges(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return vocab


class GrammarTokenizer:
    """The package's CLIPTokenizer over the built vocabulary, plus SD 1.x 77-token batches."""

    def __init__(self, folder: Path):
        self.tok = CLIPTokenizer(folder)
        self.vocab = self.tok.vocab
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id
        for w in toy_data.grammar_words():  # every grammar word must be one token
            assert len(self.tok.encode(w)) == 1, (w, self.tok.tokens(w))

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text)

    def ids(self, texts: List[str]) -> torch.Tensor:
        """[B, 77] long: start token, tokens, end token, padded with the end token (SD 1.x)."""
        out = torch.full((len(texts), MAX_TOKENS), self.eos_id, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [self.bos_id] + self.encode(t)[: MAX_TOKENS - 2] + [self.eos_id]
            out[i, : len(toks)] = torch.tensor(toks)
        return out


# ----------------------------------------------------------------------------- config and schedule

def tiny_config(vocab_size: int, bos_id: int, eos_id: int, vae_channels: int = 8) -> SDConfig:
    width = 64
    clip = CLIPTextConfig(vocab_size=vocab_size, max_positions=MAX_TOKENS, width=width, layers=2, heads=4,
                          mlp_width=4 * width, bos_token_id=bos_id, eos_token_id=eos_id)
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), num_heads=4, transformer_depth=1, context_dim=width,
                      norm_groups=16)
    vae = VAEConfig(latent_channels=4, base_channels=vae_channels, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                    norm_groups=4)
    return SDConfig(unet=unet, clip=clip, vae=vae)


def sd1_alphas_cumprod() -> torch.Tensor:
    """SD 1.x discrete schedule: 1000 scaled-linear betas from 0.00085 to 0.012 -> cumulative alphas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# ----------------------------------------------------------------------------- state files

def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path):
    """Our own training state, read like any pickle here: weights_only=True, with the one class of ours that
    the latents cache holds (toy_data.Scene, a plain frozen dataclass) allowed."""
    if not path.exists():
        return None
    with torch.serialization.safe_globals([toy_data.Scene]):
        return torch.load(path, map_location="cpu", weights_only=True)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to 10 %


# ----------------------------------------------------------------------------- stage 2: VAE

def pixel_weights(images: np.ndarray, scenes, args) -> torch.Tensor:
    """Reconstruction weight per pixel, [B, 1, H, W]: 1, plus up to fg_weight on and around the shape, plus
    edge_weight on the 3x3 band across the shape's outline (where a soft decoder rounds corners and cuts a
    triangle's apex). Shapes cover 3-10 % of the picture, so their pixels weigh more and their colour is learnt
    early; the extra weight fades out over fg_ring px around the shape (the shape grown by fg_ring // 2, then a
    box blur of that width: an odd fg_ring counts as the even number below it, 1 as no fade): where the weight
    drops abruptly, the decoder paints halos (v1 weighted only the shape's own pixels and drew dark halos just
    outside them, which the scorer reads as bigger, rounder shapes). fg_ring 0 and edge_weight 0 give v1's
    weighting (1 + fg_weight on the shape's pixels); the defaults (fade over 6 px, outline 8) made v2."""
    bg = np.array([toy_data.COLOURS[s.background] for s in scenes], np.int16)[:, None, None]  # (B, 1, 1, 3)
    fg = torch.from_numpy(np.abs(images.astype(np.int16) - bg).sum(-1) > 0).float().unsqueeze(1)  # (B, 1, H, W)
    grow = lambda m, r: F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    r = args.fg_ring // 2
    near = F.avg_pool2d(grow(fg, r), 2 * r + 1, stride=1, padding=r, count_include_pad=False) if r > 0 else fg
    w = 1.0 + args.fg_weight * near
    if args.edge_weight:  # (skipped at 0: this runs every VAE step)
        w = w + args.edge_weight * (grow(fg, 1) - (1.0 - grow(1.0 - fg, 1)))  # dilated minus eroded: the outline
    return w


def train_vae(cfg: SDConfig, work: Path, args) -> AutoencoderKL:
    path = work / "vae_state.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(cfg.vae)
    with torch.no_grad():  # start with a narrow posterior (std ~0.05) so the decoder can use z from step one
        vae.quant_conv.bias[cfg.vae.latent_channels:] = args.init_logvar
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state, start = load_state(path), 0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if start < args.vae_steps:
        vae.train()
        bar = tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="vae", dynamic_ncols=True)
        last_save = time.time()
        for step in bar:
            images, _, scenes = toy_data.make_batch([args.seed, 1, step], args.vae_batch, args.resolution)
            x = toy_data.to_tensor(images)  # (B, 3, H, W) in -1..1
            w = pixel_weights(images, scenes, args)  # (B, 1, H, W)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            post = vae.encode(x)
            rec = vae.decode(post.sample(gen))  # (B, 4, h, w) -> (B, 3, H, W)
            mse = (w * (rec - x) ** 2).mean()
            kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1.0 - post.logvar).sum(dim=(1, 2, 3)).mean() / x[0].numel()
            loss = mse + args.kl_weight * kl
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
            if step + 1 == args.vae_steps or time.time() - last_save > args.save_every_s:
                save_state(path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
                last_save = time.time()
    vae.eval().requires_grad_(False)
    return vae


# ----------------------------------------------------------------------------- stage 3: latents

@torch.no_grad()
def encode_latents(vae: AutoencoderKL, work: Path, args) -> dict:
    path = work / "latents.pt"
    cached = load_state(path)
    if cached is not None and cached["n"] == args.num_latents:
        return cached
    means, stds, scenes = [], [], []
    for i in tqdm(range(0, args.num_latents, 256), desc="latents", dynamic_ncols=True):
        n = min(256, args.num_latents - i)
        images, _, sc = toy_data.make_batch([args.seed, 2, i], n, args.resolution)
        post = vae.encode(toy_data.to_tensor(images))
        means.append(post.mean)
        stds.append(post.std)
        scenes += sc
    mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, h, w)
    gen = torch.Generator().manual_seed(args.seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    scale = float(f"{1.0 / z.std().item():.5g}")  # scaled latents get unit variance (SD 1.x: 0.18215)
    data = {"mean": mean, "std": std, "scenes": scenes, "scale": scale, "n": args.num_latents}
    save_state(path, data)
    return data


# ----------------------------------------------------------------------------- stage 4: diffusion

def train_diffusion(cfg: SDConfig, tok: GrammarTokenizer, data: dict, work: Path, args):
    path = work / "diffusion_state.pt"
    torch.manual_seed(args.seed + 1)
    clip, unet = CLIPTextModel(cfg.clip), UNetModel(cfg.unet)
    params = list(clip.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    state, start = load_state(path), 0
    if state is not None:
        clip.load_state_dict(state["clip"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
    ac = sd1_alphas_cumprod()
    snr = ac / (1 - ac)
    weight = snr.clamp(max=args.min_snr) / snr  # min-SNR-gamma weighting for eps prediction
    N, scale = data["n"], data["scale"]
    if start < args.steps:
        clip.train(), unet.train()
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="diffusion", dynamic_ncols=True)
        last_save = time.time()
        for step in bar:
            rng = np.random.default_rng([args.seed, 4, step])
            idx = rng.integers(N, size=args.batch)
            captions = [toy_data.random_caption(data["scenes"][i], rng) for i in idx]
            captions = [c if u >= args.uncond_p else "" for c, u in zip(captions, rng.random(args.batch))]
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            ii = torch.from_numpy(idx)
            x0 = (data["mean"][ii] + data["std"][ii] * torch.randn(data["mean"][ii].shape, generator=gen)) * scale
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps  # (B, 4, h, w)
            context = clip(tok.ids(captions)).z  # (B, 77) -> (B, 77, D)
            pred = unet(xt, t.float(), context)
            loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.lr, 200)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - decay)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            stop = args.stop_at_step is not None and step + 1 >= args.stop_at_step
            if step + 1 == args.steps or stop or time.time() - last_save > args.save_every_s:
                save_state(path, {"clip": clip.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                                  "ema": ema, "step": step + 1})
                last_save = time.time()
            if stop:
                return None
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return clip.eval(), unet.eval()


# ----------------------------------------------------------------------------- stage 5: export

def export(cfg: SDConfig, vae, clip, unet, tok_dir: Path, out: Path) -> Path:
    model = StableDiffusion(cfg, SD1)
    model.vae.load_state_dict(vae.state_dict())
    model.clip.load_state_dict(clip.state_dict())
    model.unet.load_state_dict(unet.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "glass-tiny.safetensors"
    save_checkpoint(model, ckpt, dtype=torch.float16, overwrite=True)
    # the vocabulary ships as one merges-only BPE file (OpenAI's layout): its ids follow from the merges
    shutil.copyfile(tok_dir / "merges.txt", out / "glass-tiny-bpe.txt")
    return ckpt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="work dir: training state, then the exported model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=10000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--vae-channels", type=int, default=16, help="VAE base channels")
    p.add_argument("--fg-weight", type=float, default=8.0, help="extra reconstruction weight on shape pixels")
    p.add_argument("--fg-ring", type=int, default=6, help="px around the shape over which its extra weight fades")
    p.add_argument("--edge-weight", type=float, default=8.0, help="extra weight on the band across the outline")
    p.add_argument("--kl-weight", type=float, default=5e-3)
    p.add_argument("--init-logvar", type=float, default=-6.0, help="initial posterior log-variance")
    p.add_argument("--num-latents", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4000, help="diffusion steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--uncond-p", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--save-every-s", type=float, default=120.0)
    p.add_argument("--stop-at-step", type=int, default=None, help="save and stop after this diffusion step")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vocab = build_vocabulary(work / "tokenizer")
    tok = GrammarTokenizer(work / "tokenizer")
    cfg = tiny_config(len(vocab), tok.bos_id, tok.eos_id, args.vae_channels)
    vae = train_vae(cfg, work, args)
    data = encode_latents(vae, work, args)
    cfg = SDConfig(unet=cfg.unet, clip=cfg.clip, vae=VAEConfig(**{**cfg.vae.__dict__, "scaling_factor": data["scale"]}))
    trained = train_diffusion(cfg, tok, data, work, args)
    if trained is None:
        print(f"stopped at diffusion step {args.stop_at_step}; run the same command again to resume")
        return None
    clip, unet = trained
    ckpt = export(cfg, vae, clip, unet, work / "tokenizer", work)
    info = {"seconds_this_run": round(time.time() - t0, 1), "args": {k: str(v) for k, v in vars(args).items()},
            "config": cfg.to_dict()}
    (work / "train_info.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.2f} MB)")
    return ckpt


if __name__ == "__main__":
    main()
