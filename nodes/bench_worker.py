"""One engine of ``glass-diffusion bench``, in its own process: loads a checkpoint once, then answers timing
requests from the driver (nodes/bench.py), one JSON object per line on stdin -> one per line on stdout.

Engines: ``glass`` (this package), ``diffusers`` (its StableDiffusionPipeline, built from the same single-file
tensors by diffusers' own converters) and ``comfyui`` (ComfyUI's CheckpointLoader / CLIPTextEncode / KSampler /
VAEDecode used as a library from a checkout). Each runs in a separate process so that every engine gets its own
peak RSS, its own torch (ComfyUI's venv may have another) and no shared caches. This file must run under any
Python with torch: it imports nothing of ComfyUI, diffusers or Glass at module level, and is started as a
script (``python bench_worker.py ...``) for ComfyUI and as a module for the others.

Requests: {"op": "t2i" | "unet_step" | "vae_decode", "batch": B} -> {"seconds": s, ...};
{"op": "stats"} -> {"peak_rss_bytes", "cuda_peak_bytes"}; {"op": "quit"}. The first line written is
{"ready": true, "load_seconds": s, ...} once the model is loaded.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.path.pop(0)  # started as a script: our nodes/ folder (it has a types.py) must not shadow the stdlib

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Engine:
    """Shared shape of the three engines: t2i(batch), unet_step(batch), vae_decode(batch)."""

    def __init__(self, a):
        self.a = a
        self.device = torch.device(a.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
        self.h = a.res // 8

    context_dim = 768  # SD 1.x

    def inputs(self, batch: int):
        """The same random UNet / VAE inputs for every engine (seeded, drawn on the CPU)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2 * batch, 4, self.h, self.h, generator=g)
        ctx = torch.randn(2 * batch, 77, self.context_dim, generator=g)
        z = torch.randn(batch, 4, self.h, self.h, generator=g)
        return x, ctx, z


class GlassEngine(_Engine):
    def __init__(self, a):
        super().__init__(a)
        from ..sd_core import builtin, speed
        from ..sd_core.checkpoint import load_checkpoint
        from ..sd_core.tokenizer import CLIPTokenizer
        from .loaders import vocabulary_for
        self.model = load_checkpoint(a.checkpoint, device=self.device, dtype=self.dtype)
        self.speed = speed.SpeedOptions.parse(a.speed, self.device, self.model.unet.config.model_channels)
        self.context_dim = self.model.unet.config.context_dim
        if self.device.type == "cuda" or self.dtype != torch.float32:
            self.model.vae.float()  # as the loader node does: the VAE stays in fp32 by default
        speed.apply(self.model, self.speed)
        path = Path(a.checkpoint)
        if path.resolve() == builtin.CHECKPOINT.resolve():
            path = builtin.CHECKPOINT  # the built-in model has its own vocabulary
        self.tokenizer = CLIPTokenizer(vocabulary_for(path))

    def t2i(self, batch):
        from ..sd_core.sampling import txt2img
        t0 = time.perf_counter()
        img = txt2img(self.model, self.tokenizer, PROMPT, width=self.a.res, height=self.a.res, batch_size=batch,
                      seed=42, steps=self.a.steps, cfg=7.5, sampler_name=self.a.sampler, scheduler="normal")
        _sync(self.device)
        return {"seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(img).all())}

    def unet_step(self, batch):
        x, ctx, _ = self.inputs(batch)
        unet = self.model.unet
        x, ctx = x.to(self.device, self.dtype), ctx.to(self.device, self.dtype)
        t = torch.full((x.shape[0],), 500.0, device=self.device)
        return _timed(lambda: unet(x, t, ctx), self.device)

    def vae_decode(self, batch):
        _, _, z = self.inputs(batch)
        vae = self.model.vae
        p = next(vae.parameters())
        z = z.to(p.device, p.dtype)
        return _timed(lambda: vae.decode(z), self.device)


class DiffusersEngine(_Engine):
    """diffusers' StableDiffusionPipeline on the same tensors; prompt embeddings come from its own
    transformers CLIPTextModel (token ids from a plain CLIP tokenizer are not needed: the pipeline is given
    `prompt_embeds`, so the tokenizer is the only part left out)."""

    def __init__(self, a):
        super().__init__(a)
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                         convert_ldm_vae_checkpoint,
                                                         create_unet_diffusers_config_from_ldm,
                                                         create_vae_diffusers_config_from_ldm)
        from safetensors.torch import load_file
        from transformers import CLIPTextConfig, CLIPTextModel
        sd = load_file(a.checkpoint)
        ldm = _v1_original_config()
        ucfg = create_unet_diffusers_config_from_ldm(ldm, sd, image_size=512)
        vcfg = create_vae_diffusers_config_from_ldm(ldm, sd, image_size=512)
        with torch.device("meta"):
            unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
            text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", max_position_embeddings=77, hidden_size=768,
                                                intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                                projection_dim=768))  # SD 1.x's CLIP ViT-L/14 text tower
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, ucfg), assign=True)
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vcfg), assign=True)
        clip_state = convert_ldm_clip_checkpoint(sd)
        clip_state.setdefault("text_model.embeddings.position_ids", torch.arange(77)[None])
        if not hasattr(text, "text_model"):  # transformers 5: CLIPTextModel has no text_model level
            clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
        text.load_state_dict(clip_state, assign=True, strict=False)
        emb = getattr(text, "text_model", text).embeddings
        if emb.position_ids.is_meta:  # a non-persistent buffer in newer transformers: state dicts do not carry it
            emb.position_ids = torch.arange(emb.position_ids.shape[-1])[None]
        left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers(), *vae.named_parameters(),
                               *vae.named_buffers(), *text.named_parameters(), *text.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"diffusers engine: tensors the checkpoint did not fill: {left[:5]}")
        del sd
        vae_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.unet = unet.to(self.device, self.dtype).eval()
        self.vae = vae.to(self.device, vae_dtype).eval()
        self.text = text.to(self.device, self.dtype).eval()
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
        self.pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text, tokenizer=None, unet=self.unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        ids = torch.tensor([[49406] + [320 + i for i in range(8)] + [49407] * 68])  # fixed 77 token ids
        self.ids = ids.to(self.device)

    @torch.no_grad()
    def t2i(self, batch):
        t0 = time.perf_counter()
        pos = self.text(self.ids)[0].repeat(batch, 1, 1)
        neg = self.text(self.ids[:, :1].repeat(1, 77))[0].repeat(batch, 1, 1)
        g = torch.Generator(device="cpu").manual_seed(42)
        img = self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=self.a.res, width=self.a.res,
                        num_inference_steps=self.a.steps, guidance_scale=7.5, generator=g, output_type="pt").images
        _sync(self.device)
        return {"seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(img).all())}

    def unet_step(self, batch):
        x, ctx, _ = self.inputs(batch)
        x, ctx = x.to(self.device, self.dtype), ctx.to(self.device, self.dtype)
        t = torch.full((x.shape[0],), 500.0, device=self.device)
        return _timed(lambda: self.unet(x, t, encoder_hidden_states=ctx).sample, self.device)

    def vae_decode(self, batch):
        _, _, z = self.inputs(batch)
        p = next(self.vae.parameters())
        z = z.to(p.device, p.dtype)
        return _timed(lambda: self.vae.decode(z).sample, self.device)


class ComfyEngine(_Engine):
    """ComfyUI's own nodes from a checkout (the working directory), as its KSampler graph runs them."""

    def __init__(self, a):
        super().__init__(a)
        sys.path.insert(0, a.comfyui)
        os.chdir(a.comfyui)
        argv, sys.argv = sys.argv, sys.argv[:1]  # ComfyUI parses the command line at import
        import comfy.cli_args
        if self.device.type == "cpu":
            comfy.cli_args.args.cpu = True
        else:
            comfy.cli_args.args.gpu_only = True  # every model stays on the GPU, like our engine
        if a.dtype == "fp32":
            comfy.cli_args.args.force_fp32 = True
        elif a.dtype == "fp16":
            comfy.cli_args.args.force_fp16 = True
        import importlib

        import comfy.sd
        # ComfyUI's own top-level `nodes` module (this worker runs in ComfyUI's process, never inside the pack)
        self.nodes = importlib.import_module("nodes")
        sys.argv = argv
        out = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=True, output_clip=True)
        self.model, self.clip, self.vae = out[:3]
        self.unet_dtype = str(self.model.model.get_dtype())

    def t2i(self, batch):
        t0 = time.perf_counter()
        enc = self.nodes.CLIPTextEncode()
        pos, neg = enc.encode(self.clip, PROMPT)[0], enc.encode(self.clip, "")[0]
        latent = {"samples": torch.zeros(batch, 4, self.h, self.h)}
        samples = self.nodes.KSampler().sample(self.model, 42, self.a.steps, 7.5, self.a.sampler, "normal", pos, neg,
                                               latent, denoise=1.0)[0]
        img = self.nodes.VAEDecode().decode(self.vae, samples)[0]
        _sync(self.device)
        return {"seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(img).all())}

    def unet_step(self, batch):
        import comfy.model_management as mm
        x, ctx, _ = self.inputs(batch)
        mm.load_models_gpu([self.model])
        inner = self.model.model  # comfy BaseModel: apply_model(x, t, c_crossattn=...) runs its UNet
        dev, dtype = mm.get_torch_device(), self.model.model.get_dtype()
        x, ctx = x.to(dev), ctx.to(dev, dtype)
        sigma = torch.full((x.shape[0],), 1.0, device=dev)
        return _timed(lambda: inner.apply_model(x, sigma, c_crossattn=ctx), dev)

    def vae_decode(self, batch):
        _, _, z = self.inputs(batch)
        return _timed(lambda: self.vae.decode(z), self.device)


def _v1_original_config() -> dict:
    """The values of CompVis' v1-inference.yaml that diffusers' single-file converters read."""
    unet = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": False,
            "legacy": False}
    vae = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                        "attn_resolutions": [], "dropout": 0.0}}
    return {"model": {"params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
                                 "scale_factor": 0.18215, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": vae}}}}


@torch.no_grad()
def _timed(fn, device) -> dict:
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(out).all())}


def _stats(device: torch.device) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": peak, "cuda_peak_bytes": cuda}


ENGINES = {"glass": GlassEngine, "diffusers": DiffusersEngine, "comfyui": ComfyEngine}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one engine of glass-diffusion bench (started by the driver)")
    ap.add_argument("--engine", choices=ENGINES, required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--speed", default="", help="Glass speed options (sd_core.speed.SpeedOptions.parse)")
    ap.add_argument("--comfyui", default="", help="ComfyUI checkout (engine comfyui)")
    a = ap.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # the protocol channel
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything the engines print goes to stderr
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        try:
            engine = ENGINES[a.engine](a)
        except Exception as e:  # one line for the driver's user, not a page of missing keys
            print(f"bench engine {a.engine}: cannot load {a.checkpoint}: {type(e).__name__}: {str(e)[:500]}",
                  file=sys.stderr)
            return 1
        _sync(engine.device)
        info = {"ready": True, "load_seconds": time.perf_counter() - t0, "torch": torch.__version__,
                "threads": torch.get_num_threads()}
        if a.engine == "comfyui":
            info["comfy_unet_dtype"] = engine.unet_dtype
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        out.write(json.dumps(info) + "\n")
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "quit":
                break
            try:
                reply = _stats(engine.device) if req["op"] == "stats" else getattr(engine, req["op"])(req["batch"])
            except Exception as e:  # reported to the driver, which prints it for this engine
                reply = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # started as a script (ComfyUI's Python): only the comfyui engine works
        ENGINES.pop("glass")
    sys.exit(main())
