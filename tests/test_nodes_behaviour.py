"""What each node does, called directly on tiny exported checkpoints (64 px, 1-3 steps)."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from glass_diffusion.nodes import image as image_nodes
from glass_diffusion.nodes.example_workflows import CHECKPOINT, INPAINT_CHECKPOINT, INPUT_IMAGE
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS as N
from glass_diffusion.nodes.types import GlassCLIP, GlassSampler, GlassUNet, GlassVAE, NodeInputError

from _nodes_util import VAE_FILE, leftovers, rgba_image, saved_pngs, tiny_env


def call(node_id, **inputs):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_env(tmp_path_factory)


@pytest.fixture
def out(env, tmp_path):
    with env.settings(tmp_path):
        yield tmp_path


@pytest.fixture(scope="module")
def models(env, tmp_path_factory):
    with env.settings(tmp_path_factory.mktemp("unused")):
        unet, clip, vae = call("GlassCheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="auto")
        pos = call("GlassTextEncode", clip=clip, text="a red (house:1.2)", weighting="comfy")[0]
        neg = call("GlassTextEncode", clip=clip, text="", weighting="comfy")[0]
    return types.SimpleNamespace(unet=unet, clip=clip, vae=vae, pos=pos, neg=neg)


def latent(batch=1, size=64):
    return call("GlassEmptyLatent", width=size, height=size, batch_size=batch)[0]


# ------------------------------------------------------------------------------------------ loaders / text

def test_checkpoint_loader_gives_our_types(models, out):
    assert isinstance(models.unet, GlassUNet) and not models.unet.is_inpaint
    assert isinstance(models.clip, GlassCLIP) and isinstance(models.vae, GlassVAE)
    assert models.unet.dtype == torch.float32  # auto on the CPU
    assert models.clip.tokenizer.vocab_size == models.clip.model.config.vocab_size
    assert CHECKPOINT in N["GlassCheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    unet9 = call("GlassCheckpointLoader", ckpt_name=INPAINT_CHECKPOINT, weight_dtype="fp32")[0]
    assert unet9.is_inpaint


def test_checkpoint_loader_lists_the_builtin_model_first_and_loads_it(env, tmp_path):
    """The built-in model is the first choice and the default, with or without a models folder, and loads with
    its own vocabulary (595 tokens, not the standard 49408)."""
    from glass_diffusion.sd_core import builtin
    from glass_diffusion.nodes import runtime
    loader = N["GlassCheckpointLoader"]
    with env.settings(tmp_path):
        names, options = loader.INPUT_TYPES()["required"]["ckpt_name"]
        assert names[0] == builtin.NAME == "glass-tiny (built-in)" and options["default"] == builtin.NAME
        assert CHECKPOINT in names and names.count(builtin.NAME) == 1
    with runtime.settings_override(models_dir=tmp_path / "no_models", device="cpu", dtype="fp32"):
        assert loader.INPUT_TYPES()["required"]["ckpt_name"][0] == [builtin.NAME]
        unet, clip, vae = call("GlassCheckpointLoader", ckpt_name=builtin.NAME, weight_dtype="auto")
        assert not unet.is_inpaint and unet.scaling_factor == pytest.approx(0.52727, abs=1e-4)
        assert clip.tokenizer.vocab_size == clip.model.config.vocab_size == 595
        assert clip.tokenizer.encode("circle") == [clip.tokenizer.encode("a circle")[1]]  # a grammar word, 1 token
        assert "glass-tiny (built-in)" in str(unet)
        with pytest.raises(NodeInputError, match="glass-tiny.safetensors"):  # the file is not a folder name
            call("GlassCheckpointLoader", ckpt_name="glass-tiny.safetensors", weight_dtype="auto")


def test_model_objects_have_short_reprs(models):
    """ComfyUI writes str(input) of a failing node into the error it sends to the browser and keeps in the history:
    a GLASS_UNET once printed its whole module tree there (37 kB for SD 1.5)."""
    texts = {name: str(obj) for name, obj in (("unet", models.unet), ("clip", models.clip), ("vae", models.vae))}
    assert texts["unet"] == f"GlassUNet({CHECKPOINT}, 4-channel, cpu float32)"
    assert texts["clip"] == f"GlassCLIP({CHECKPOINT}, clip_skip=-1, cpu float32)"
    assert texts["vae"] == f"GlassVAE({CHECKPOINT}, cpu float32)"
    assert str(models.clip.with_clip_skip(-2)).startswith("GlassCLIP(") and "clip_skip=-2" in str(models.clip.with_clip_skip(-2))
    assert repr([models.unet]) == f"[{texts['unet']}]"


def test_loaders_name_node_and_input_on_errors(out):
    with pytest.raises(NodeInputError, match="GlassCheckpointLoader: input 'ckpt_name'.*missing.safetensors"):
        call("GlassCheckpointLoader", ckpt_name="missing.safetensors", weight_dtype="auto")
    with pytest.raises(NodeInputError, match="GlassVAELoader: input 'weight_dtype'"):
        call("GlassVAELoader", vae_name=VAE_FILE, weight_dtype="fp8")


def test_vae_loader_and_bf16(out, env):
    vae = call("GlassVAELoader", vae_name=VAE_FILE, weight_dtype="bf16")[0]
    assert isinstance(vae, GlassVAE) and vae.dtype == torch.bfloat16
    img = call("GlassVAEDecode", samples=latent(), vae=vae)[0]
    assert img.dtype == torch.float32 and img.shape == (1, 64, 64, 3)


def test_vocabulary_that_does_not_fit_is_refused(env, tmp_path):
    import shutil
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(env.models / "checkpoints" / CHECKPOINT, models / "checkpoints" / "other.safetensors")
    from _nodes_util import write_vocabulary
    write_vocabulary(models / "checkpoints" / "other.tokenizer", 1100)  # the model has 1000 tokens
    with env.settings(tmp_path):
        from glass_diffusion.nodes import runtime
        with runtime.settings_override(models_dir=models):
            with pytest.raises(NodeInputError, match="does not fit the text model"):
                call("GlassCheckpointLoader", ckpt_name="other.safetensors", weight_dtype="auto")


def test_text_encode_weighting_and_clip_skip(models):
    cond = models.pos
    assert isinstance(cond, list) and len(cond) == 1
    z, extra = cond[0]
    assert z.shape == (1, 77, models.clip.model.config.width) and "pooled_output" in extra
    a1111 = call("GlassTextEncode", clip=models.clip, text="a red (house:1.2)", weighting="a1111")[0]
    assert not torch.allclose(a1111[0][0], z)
    skipped = call("GlassClipSkip", clip=models.clip, stop_at_clip_layer=-2)[0]
    assert skipped.clip_skip == -2 and models.clip.clip_skip == -1  # the input is not changed
    assert skipped.model is models.clip.model  # weights shared
    z2 = call("GlassTextEncode", clip=skipped, text="a red (house:1.2)", weighting="comfy")[0][0][0]
    assert not torch.allclose(z2, z)
    with pytest.raises(NodeInputError, match="GlassClipSkip: input 'stop_at_clip_layer'"):
        call("GlassClipSkip", clip=models.clip, stop_at_clip_layer=-3)  # the tiny encoder has 2 layers
    with pytest.raises(NodeInputError, match="GlassTextEncode: input 'clip'"):
        call("GlassTextEncode", clip=models.vae, text="x", weighting="comfy")


# ------------------------------------------------------------------------------------------ latent

def test_latent_nodes():
    lat = latent(batch=3)
    assert lat["samples"].shape == (3, 4, 8, 8) and not lat["samples"].any()
    up = call("GlassLatentUpscale", samples=lat, upscale_method="bilinear", width=128, height=0, crop="disabled")[0]
    assert up["samples"].shape == (3, 4, 16, 16)
    wide = {"samples": torch.randn(1, 4, 8, 16)}
    c = call("GlassLatentUpscale", samples=wide, upscale_method="nearest-exact", width=64, height=64, crop="center")[0]
    torch.testing.assert_close(c["samples"], wide["samples"][..., 4:12])  # centre cut, same size
    mask = torch.zeros(64, 64)
    mask[8:24] = 1
    masked = call("GlassSetNoiseMask", samples=lat, mask=mask)[0]
    assert masked["noise_mask"].shape == (1, 1, 64, 64) and "noise_mask" not in lat
    lat["samples"] = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 8, 8).clone()
    picked = call("GlassLatentFromBatch", samples=lat, batch_index=1, length=5)[0]
    assert picked["batch_index"] == [1, 2] and picked["samples"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    again = call("GlassLatentFromBatch", samples=picked, batch_index=1, length=1)[0]
    assert again["batch_index"] == [2]
    with pytest.raises(NodeInputError, match="GlassLatentUpscale: input 'samples'"):
        call("GlassLatentUpscale", samples=torch.zeros(1), upscale_method="bilinear", width=64, height=64,
             crop="disabled")
    with pytest.raises(NodeInputError, match="GlassLatentUpscale: input 'crop'"):  # not silently 'disabled'
        call("GlassLatentUpscale", samples=lat, upscale_method="bilinear", width=64, height=64, crop="centre")


# ------------------------------------------------------------------------------------------ VAE

def test_vae_encode_decode_and_tiles(models):
    pixels = torch.rand(2, 68, 60, 3)  # not multiples of 8: centre-cropped
    lat = call("GlassVAEEncode", pixels=pixels, vae=models.vae)[0]
    assert lat["samples"].shape == (2, 4, 8, 7)
    img = call("GlassVAEDecode", samples=lat, vae=models.vae)[0]
    assert img.shape == (2, 64, 56, 3) and 0 <= img.min() and img.max() <= 1
    # one tile covering everything is the plain decode / encode
    whole = call("GlassVAEDecodeTiled", samples=lat, vae=models.vae, tile_size=512, overlap=64)[0]
    torch.testing.assert_close(whole, img)
    enc_whole = call("GlassVAEEncodeTiled", pixels=pixels, vae=models.vae, tile_size=512, overlap=64)[0]
    torch.testing.assert_close(enc_whole["samples"], lat["samples"])
    # real tiles: right shape, close to the plain result away from any seam treatment
    big = {"samples": torch.randn(1, 4, 16, 16)}
    tiled = call("GlassVAEDecodeTiled", samples=big, vae=models.vae, tile_size=64, overlap=32)[0]
    plain = call("GlassVAEDecode", samples=big, vae=models.vae)[0]
    assert tiled.shape == plain.shape == (1, 128, 128, 3)
    assert (tiled - plain).abs().mean() < 0.1
    enc_tiled = call("GlassVAEEncodeTiled", pixels=torch.rand(1, 128, 128, 3), vae=models.vae, tile_size=64,
                     overlap=32)[0]
    assert enc_tiled["samples"].shape == (1, 4, 16, 16)


def test_vae_encode_for_inpaint_greys_the_mask_and_grows_it(models, monkeypatch):
    pixels = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 24:40, 24:40] = 1
    seen = {}
    real = models.vae.model.encode

    def spy(x):
        seen["x"] = x.clone()
        return real(x)

    monkeypatch.setattr(models.vae.model, "encode", spy)
    out = call("GlassVAEEncodeForInpaint", pixels=pixels, vae=models.vae, mask=mask, grow_mask_by=6)[0]
    x = seen["x"]  # -1..1: grey (0.5) is 0
    assert x[:, :, 24:40, 24:40].abs().max() == 0 and x[:, :, :24].abs().max() > 0
    m = out["noise_mask"]
    assert m.shape == (1, 1, 64, 64) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m.sum() > mask.sum() and m[0, 0, 24:40, 24:40].all()


# ------------------------------------------------------------------------------------------ sampling

def test_scheduler_and_sampler_select(models):
    sigmas = call("GlassScheduler", unet=models.unet, scheduler="karras", steps=4, denoise=1.0)[0]
    assert sigmas.shape == (5,) and sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    half = call("GlassScheduler", unet=models.unet, scheduler="normal", steps=4, denoise=0.5)[0]
    full8 = call("GlassScheduler", unet=models.unet, scheduler="normal", steps=8, denoise=1.0)[0]
    torch.testing.assert_close(half, full8[-5:])  # ComfyUI's denoise semantics
    s = call("GlassSamplerSelect", sampler_name="dpmpp_2m", step_noise="cpu")[0]
    assert isinstance(s, GlassSampler) and s.name == "dpmpp_2m"
    with pytest.raises(NodeInputError, match="GlassSamplerSelect: input 'sampler_name'"):
        call("GlassSamplerSelect", sampler_name="nope", step_noise="cpu")


def test_denoise_steps_split_equals_the_whole_loop(models):
    sigmas = call("GlassScheduler", unet=models.unet, scheduler="karras", steps=3, denoise=1.0)[0]
    euler = call("GlassSamplerSelect", sampler_name="euler", step_noise="cpu")[0]
    common = dict(unet=models.unet, positive=models.pos, negative=models.neg, sampler=euler, sigmas=sigmas,
                  noise_seed=7, cfg=5.0)
    whole, whole_x0 = call("GlassSample", add_noise=True, latent_image=latent(), **common)
    a, a_x0 = call("GlassDenoiseSteps", latent_image=latent(), add_noise=True, start_step=0, end_step=1, **common)
    b, b_x0 = call("GlassDenoiseSteps", latent_image=a, add_noise=False, start_step=1, end_step=3, **common)
    # the latent between the two pieces is unscaled and rescaled (x / s * s): a few ulps, amplified by the
    # remaining steps, so equality holds to ~1e-5 (it depends on the thread count's summation order)
    torch.testing.assert_close(b["samples"], whole["samples"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_x0["samples"], whole_x0["samples"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a["samples"], b["samples"])
    assert not torch.allclose(a_x0["samples"], a["samples"])  # x0 is the estimate, not the noisy latent
    with pytest.raises(NodeInputError, match="GlassDenoiseSteps: input 'end_step'"):
        call("GlassDenoiseSteps", latent_image=a, add_noise=False, start_step=1, end_step=4, **common)
    with pytest.raises(NodeInputError, match="GlassDenoiseSteps: input 'start_step'"):
        call("GlassDenoiseSteps", latent_image=a, add_noise=False, start_step=3, end_step=3, **common)


def test_unet_predict_is_one_denoise_step(models):
    """Euler from sigma s straight to 0 lands on the x0 estimate at s; eps and x0 satisfy x0 = x - s * eps."""
    x = {"samples": torch.randn(1, 4, 8, 8) * 3}
    s = 2.5
    eps, x0 = call("GlassUNetPredict", unet=models.unet, positive=models.pos, negative=models.neg, latent=x,
                   cfg=4.0, sigma=s)
    euler = call("GlassSamplerSelect", sampler_name="euler", step_noise="cpu")[0]
    step = call("GlassSample", unet=models.unet, add_noise=False, noise_seed=0, cfg=4.0, positive=models.pos,
                negative=models.neg, sampler=euler, sigmas=torch.tensor([s, 0.0]), latent_image=x)[0]
    torch.testing.assert_close(x0["samples"], step["samples"], atol=1e-5, rtol=1e-5)
    sf = models.unet.scaling_factor
    torch.testing.assert_close(x0["samples"] * sf, x["samples"] * sf - s * eps["samples"], atol=1e-5, rtol=1e-5)
    sigmas = torch.tensor([5.0, s, 0.0])
    eps2, _ = call("GlassUNetPredict", unet=models.unet, positive=models.pos, negative=models.neg, latent=x,
                   cfg=4.0, sigma=99.0, sigmas=sigmas, step=1)  # sigma taken from the schedule
    torch.testing.assert_close(eps2["samples"], eps["samples"])
    with pytest.raises(NodeInputError, match="GlassUNetPredict: input 'sigma'"):
        call("GlassUNetPredict", unet=models.unet, positive=models.pos, negative=models.neg, latent=x, cfg=4.0,
             sigma=0.0)
    with pytest.raises(NodeInputError, match="GlassUNetPredict: input 'latent'.*3 channels"):
        call("GlassUNetPredict", unet=models.unet, positive=models.pos, negative=models.neg,
             latent={"samples": torch.zeros(1, 3, 8, 8)}, cfg=4.0, sigma=1.0)


def test_ksampler_is_deterministic_and_honours_denoise_and_masks(models):
    ks = dict(unet=models.unet, steps=2, cfg=6.0, sampler_name="euler_ancestral", scheduler="normal",
              positive=models.pos, negative=models.neg)
    a = call("GlassKSampler", seed=3, latent_image=latent(), **ks)[0]
    b = call("GlassKSampler", seed=3, latent_image=latent(), **ks)[0]
    c = call("GlassKSampler", seed=4, latent_image=latent(), **ks)[0]
    torch.testing.assert_close(a["samples"], b["samples"])
    assert not torch.allclose(a["samples"], c["samples"])
    same = call("GlassKSampler", seed=3, latent_image=a, denoise=0.0, **ks)[0]
    torch.testing.assert_close(same["samples"], a["samples"])
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1
    src = {"samples": torch.randn(1, 4, 8, 8)}
    masked = call("GlassSetNoiseMask", samples=src, mask=mask)[0]
    out = call("GlassKSampler", seed=3, latent_image=masked, **ks)[0]
    torch.testing.assert_close(out["samples"][..., :4], src["samples"][..., :4])  # kept where mask = 0
    assert not torch.allclose(out["samples"][..., 4:], src["samples"][..., 4:])
    assert "noise_mask" in out


def test_sampling_errors_name_node_and_input(models):
    ks = dict(unet=models.unet, seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
              latent_image=latent())
    with pytest.raises(NodeInputError, match="GlassKSampler: input 'positive'"):
        call("GlassKSampler", positive=[[torch.zeros(1, 77, 768), {}]], negative=models.neg, **ks)
    with pytest.raises(NodeInputError, match="GlassKSampler: input 'unet'"):
        call("GlassKSampler", **{**ks, "unet": models.vae}, positive=models.pos, negative=models.neg)
    with pytest.raises(NodeInputError, match="GlassKSampler: input 'scheduler'"):
        call("GlassKSampler", **{**ks, "scheduler": "nope"}, positive=models.pos, negative=models.neg)


class _ComfyStubs:
    """comfy.utils.ProgressBar and comfy.model_management as ComfyUI provides them, recording calls."""

    def __init__(self, cancel_after=None):
        self.updates, self.cancel_after, self.checks = [], cancel_after, 0
        comfy = types.ModuleType("comfy")
        utils = types.ModuleType("comfy.utils")
        mm = types.ModuleType("comfy.model_management")
        stubs = self

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                stubs.updates.append((value, total, preview))

        def throw_exception_if_processing_interrupted():
            stubs.checks += 1
            if stubs.cancel_after is not None and len(stubs.updates) >= stubs.cancel_after:
                raise InterruptedError("cancelled in ComfyUI")

        utils.ProgressBar = ProgressBar
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        comfy.utils, comfy.model_management = utils, mm
        self.modules = {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}


def test_inside_comfyui_progress_previews_and_cancel(models, monkeypatch):
    stubs = _ComfyStubs()
    for name, mod in stubs.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    ks = dict(unet=models.unet, seed=0, steps=3, cfg=2.0, sampler_name="euler", scheduler="normal",
              positive=models.pos, negative=models.neg, latent_image=latent())
    call("GlassKSampler", **ks)
    assert [u[0] for u in stubs.updates] == [1, 2, 3] and all(u[1] == 3 for u in stubs.updates)
    kind, preview, size = stubs.updates[0][2]
    assert kind == "JPEG" and isinstance(preview, Image.Image) and preview.size == (8, 8)
    stubs.updates.clear()
    sigmas = call("GlassScheduler", unet=models.unet, scheduler="normal", steps=4, denoise=1.0)[0]
    euler = call("GlassSamplerSelect", sampler_name="euler", step_noise="cpu")[0]
    call("GlassDenoiseSteps", unet=models.unet, positive=models.pos, negative=models.neg, sampler=euler,
         sigmas=sigmas, latent_image=latent(), add_noise=True, noise_seed=0, cfg=2.0, start_step=1, end_step=3)
    assert [u[:2] for u in stubs.updates] == [(1, 2), (2, 2)]  # the bar counts the steps this node runs
    stubs.updates.clear()
    stubs.cancel_after = 1
    with pytest.raises(InterruptedError):
        call("GlassKSampler", **ks)
    assert len(stubs.updates) == 1


# ------------------------------------------------------------------------------------------ images

def test_load_image_mask_is_one_minus_alpha(env, out):
    image, mask = call("GlassLoadImage", image=INPUT_IMAGE)
    ref = np.asarray(rgba_image(), dtype=np.float32) / 255
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    np.testing.assert_allclose(image[0].numpy(), ref[..., :3])
    np.testing.assert_allclose(mask[0].numpy(), 1 - ref[..., 3])
    assert N["GlassLoadImage"].VALIDATE_INPUTS(image=INPUT_IMAGE) is True
    assert "GlassLoadImage" in N["GlassLoadImage"].VALIDATE_INPUTS(image="nope.png")
    assert INPUT_IMAGE in N["GlassLoadImage"].INPUT_TYPES()["required"]["image"][0]
    h1 = N["GlassLoadImage"].IS_CHANGED(image=INPUT_IMAGE)
    Image.new("RGB", (8, 8)).save(env.input / "other.png")
    assert N["GlassLoadImage"].IS_CHANGED(image="other.png") != h1
    rgb_image, rgb_mask = call("GlassLoadImage", image="other.png")
    assert rgb_mask.shape == (1, 64, 64) and not rgb_mask.any()  # no alpha: ComfyUI's 64x64 zeros


def test_load_image_16bit_greyscale_keeps_its_levels(env, out):
    """A 16-bit greyscale PNG (Pillow mode I;16) is scaled to 0..1, not clipped to white."""
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(levels).save(env.input / "grey16.png")
    image, mask = call("GlassLoadImage", image="grey16.png")
    assert image.shape == (1, 64, 64, 3) and not mask.any()
    ref = levels.astype(np.float32) / 65535
    assert np.abs(image[0, ..., 0].numpy() - ref).max() < 3 / 255  # ComfyUI scales by 1/255, then 8 bits
    assert torch.equal(image[..., 0], image[..., 2])


def test_save_image_metadata_numbering_and_subfolders(out):
    images = torch.rand(2, 16, 24, 3)
    prompt = {"1": {"class_type": "X", "inputs": {}}}
    extra = {"workflow": {"nodes": [], "links": []}, "other": [1, 2]}
    r = call("GlassSaveImage", images=images, filename_prefix="pics/run", prompt=prompt, extra_pnginfo=extra)
    assert r["ui"]["images"] == [{"filename": "run_00001_.png", "subfolder": "pics", "type": "output"},
                                 {"filename": "run_00002_.png", "subfolder": "pics", "type": "output"}]
    with Image.open(out / "pics" / "run_00001_.png") as im:
        assert list(im.text) == ["prompt", "workflow", "other"]  # prompt first, then extra_pnginfo in order
        assert im.text["prompt"] == json.dumps(prompt) and json.loads(im.text["other"]) == [1, 2]
        np.testing.assert_array_equal(np.asarray(im), (255 * images[0].numpy()).clip(0, 255).astype(np.uint8))
    call("GlassSaveImage", images=images[:1], filename_prefix="pics/run")
    assert sorted(p.name for p in (out / "pics").iterdir()) == [
        "run_00001_.png", "run_00002_.png", "run_00003_.png"]
    # someone else's higher number is respected; other prefixes are not counted
    (out / "pics" / "run_00010_.png").write_bytes(b"not ours")
    (out / "pics" / "runner_00050_.png").write_bytes(b"not ours")
    r = call("GlassSaveImage", images=images[:1], filename_prefix="pics/run")
    assert r["ui"]["images"][0]["filename"] == "run_00011_.png"
    assert (out / "pics" / "run_00010_.png").read_bytes() == b"not ours"
    with pytest.raises(NodeInputError, match="GlassSaveImage: input 'filename_prefix'"):
        call("GlassSaveImage", images=images, filename_prefix="../escape")
    for empty in ("", "pics/.."):  # the folder itself: a clear error, not a crash deep in the path code
        with pytest.raises(NodeInputError, match="GlassSaveImage: input 'filename_prefix'.*names no file"):
            call("GlassSaveImage", images=images, filename_prefix=empty)
    r = call("GlassSaveImage", images=images[:1], filename_prefix="size_%width%x%height%")
    assert r["ui"]["images"][0]["filename"] == "size_24x16_00001_.png"
    assert leftovers(out) == []


def test_save_never_replaces_a_file_taken_meanwhile(out, monkeypatch):
    """Another process takes the number between our scan and our write: we move on, never overwrite."""
    (out / "race_00001_.png").write_bytes(b"theirs")
    monkeypatch.setattr(image_nodes, "next_counter", lambda folder, name: 1)
    r = call("GlassSaveImage", images=torch.rand(1, 8, 8, 3), filename_prefix="race")
    assert r["ui"]["images"][0]["filename"] == "race_00002_.png"
    assert (out / "race_00001_.png").read_bytes() == b"theirs"
    assert leftovers(out) == []


def test_failing_save_leaves_nothing(out, monkeypatch):
    real = image_nodes.image_to_pil
    calls = []

    def fail_on_second(image):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(image)

    monkeypatch.setattr(image_nodes, "image_to_pil", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        call("GlassSaveImage", images=torch.rand(3, 8, 8, 3), filename_prefix="fail")
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_preview_goes_to_the_temp_folder(out, env, tmp_path, monkeypatch):
    monkeypatch.setenv("GLASS_DIFFUSION_TEMP", str(tmp_path / "temp"))
    r = call("GlassPreviewImage", images=torch.rand(1, 8, 8, 3))
    item = r["ui"]["images"][0]
    assert item["type"] == "temp" and (tmp_path / "temp" / item["filename"]).is_file()
    assert [p for p in saved_pngs(out) if "temp" not in p.relative_to(out).parts] == []  # nothing in output


def test_auto_dtype_keeps_the_vae_out_of_fp16():
    from glass_diffusion.nodes import paths
    assert paths.vae_dtype("auto", torch.float16) == torch.float32
    assert paths.vae_dtype("fp16", torch.float16) == torch.float16
    assert paths.vae_dtype("auto", torch.bfloat16) == torch.bfloat16


def test_inside_comfyui_end_to_end(env, tmp_path, monkeypatch):
    """With ComfyUI's folder_paths / comfy modules present, the same classes list ComfyUI's model folders, use
    its device choice, output and input folders, and report progress to its bar."""
    stubs = _ComfyStubs()
    mm = stubs.modules["comfy.model_management"]
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.should_use_fp16 = lambda device=None: False
    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda kind: sorted(os.listdir(env.models / kind)) if kind in ("checkpoints", "vae") else []
    fp.get_full_path = lambda kind, name: str(env.models / kind / name)
    fp.get_folder_paths = lambda kind: [str(env.models / kind)]
    fp.get_output_directory = lambda: str(tmp_path / "comfy_out")
    fp.get_input_directory = lambda: str(env.input)
    fp.get_temp_directory = lambda: str(tmp_path / "comfy_temp")
    fp.get_annotated_filepath = lambda name: str(env.input / name)
    for name, mod in {**stubs.modules, "folder_paths": fp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("GLASS_DIFFUSION_MODELS", str(tmp_path / "nowhere"))  # headless settings are not used

    assert CHECKPOINT in N["GlassCheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    unet, clip, vae = call("GlassCheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="auto")
    assert unet.dtype == torch.float32 and clip.embeddings_dir == str(env.models / "embeddings")
    pixels, mask = call("GlassLoadImage", image=INPUT_IMAGE)
    lat = call("GlassVAEEncode", pixels=pixels, vae=vae)[0]
    pos = call("GlassTextEncode", clip=clip, text="a door", weighting="comfy")[0]
    lat = call("GlassKSampler", unet=unet, seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
               positive=pos, negative=pos, latent_image=call("GlassSetNoiseMask", samples=lat, mask=mask)[0],
               denoise=0.8)[0]
    assert [u[0] for u in stubs.updates] == [1, 2]
    r = call("GlassSaveImage", images=call("GlassVAEDecode", samples=lat, vae=vae)[0], filename_prefix="ComfyUI",
             prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    assert (tmp_path / "comfy_out" / r["ui"]["images"][0]["filename"]).is_file()


def test_comfyui_data_made_by_its_own_nodes_plug_in(models):
    """Formats as ComfyUI's nodes make them: ConditioningCombine (list concatenation), ConditioningSetArea
    (an 'area' / 'strength' entry), a 2-D MASK, EmptyLatentImage's plain dict."""
    combined = models.pos + [[models.neg[0][0], {**models.neg[0][1], "area": (4, 4, 0, 0), "strength": 0.7}]]
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    masked = call("GlassSetNoiseMask", samples=lat, mask=torch.ones(64, 64))[0]
    out = call("GlassKSampler", unet=models.unet, seed=0, steps=1, cfg=2.0, sampler_name="euler",
               scheduler="normal", positive=combined, negative=models.neg, latent_image=masked, denoise=1.0)[0]
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    plain = call("GlassKSampler", unet=models.unet, seed=0, steps=1, cfg=2.0, sampler_name="euler",
                 scheduler="normal", positive=models.pos, negative=models.neg, latent_image=masked, denoise=1.0)[0]
    assert not torch.allclose(out["samples"], plain["samples"])  # the area entry took part


def test_embeddings_come_from_the_models_embeddings_folder(models, env, out):
    from safetensors.torch import save_file
    width = models.clip.model.config.width
    torch.manual_seed(5)
    save_file({"emb_params": torch.randn(2, width)}, str(env.models / "embeddings" / "glassy.safetensors"))
    assert models.clip.embeddings_dir == str(env.models / "embeddings")
    with_emb = call("GlassTextEncode", clip=models.clip, text="a house, embedding:glassy", weighting="comfy")[0]
    import dataclasses
    no_dir = dataclasses.replace(models.clip, embeddings_dir=None)  # then 'embedding:glassy' is plain text
    as_text = call("GlassTextEncode", clip=no_dir, text="a house, embedding:glassy", weighting="comfy")[0]
    assert not torch.allclose(with_emb[0][0], as_text[0][0])
    again = call("GlassTextEncode", clip=models.clip, text="a house, embedding:glassy", weighting="comfy")[0]
    torch.testing.assert_close(again[0][0], with_emb[0][0])


def test_model_paths_stay_inside_the_models_folder_but_follow_symlinks(env, tmp_path):
    from glass_diffusion.nodes import paths, runtime
    models = tmp_path / "models"
    (models / "checkpoints" / "sub").mkdir(parents=True)
    os.symlink(env.models / "checkpoints" / CHECKPOINT, models / "checkpoints" / "sub" / "linked.safetensors")
    (models / "secret.safetensors").write_bytes(b"")
    (models / "checkpoints" / "notes.txt").write_text("not a model")
    with runtime.settings_override(models_dir=models):
        assert paths.list_files("checkpoints") == ["sub/linked.safetensors"]
        assert paths.full_path("checkpoints", "sub/linked.safetensors") is not None
        assert paths.full_path("checkpoints", "../secret.safetensors") is None
        assert paths.full_path("checkpoints", "missing.safetensors") is None
        assert paths.list_files("vae") == []
