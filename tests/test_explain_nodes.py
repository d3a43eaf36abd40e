"""The explain nodes on the built-in model: Attention Maps (ComfyUI MASK / IMAGE conventions, the same picture
as the KSampler), Step Film (one frame per step) and Save Animation (WebP / GIF through the output transaction)."""
import os

import pytest
import torch
from PIL import Image

from glass_diffusion.nodes import outputs, runtime
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS as N
from glass_diffusion.nodes.types import NodeInputError
from glass_diffusion.sd_core import builtin

PROMPT = "a large red circle at the top left on a blue background"
SETTINGS = dict(seed=4, steps=5, cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0)


def call(node_id, **inputs):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with runtime.settings_override(models_dir=tmp_path_factory.mktemp("models"), device="cpu"):
        unet, clip, vae = call("GlassCheckpointLoader", ckpt_name=builtin.NAME, weight_dtype="fp32")
        negative = call("GlassTextEncode", clip=clip, text="", weighting="comfy")[0]
        latent = call("GlassEmptyLatent", width=64, height=64, batch_size=1)[0]
        yield unet, clip, vae, negative, latent
    torch.set_num_threads(threads)


def test_attention_maps_node(loaded):
    unet, clip, vae, negative, latent = loaded
    image, masks, heat, words, out = call("GlassAttentionMaps", unet=unet, clip=clip, vae=vae, text=PROMPT,
                                          negative=negative, latent_image=latent, **SETTINGS)
    labels = words.split("\n")
    assert labels == ["a", "large", "red", "circle", "at", "the", "top", "left", "on", "a (2)", "blue", "background"]
    assert image.shape == (1, 64, 64, 3) and masks.shape == (len(labels), 64, 64)
    assert heat.shape == (len(labels), 64, 64, 3) and heat.dtype == masks.dtype == torch.float32
    assert 0 <= float(masks.min()) and float(masks.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    assert 0 <= float(heat.min()) and float(heat.max()) <= 1
    # the picture is the KSampler's, bit for bit
    positive = call("GlassTextEncode", clip=clip, text=PROMPT, weighting="comfy")[0]
    plain = call("GlassKSampler", unet=unet, positive=positive, negative=negative, latent_image=latent, **SETTINGS)[0]
    assert torch.equal(out["samples"], plain["samples"])
    assert torch.equal(image, call("GlassVAEDecode", samples=plain, vae=vae)[0])
    # a word list and a threshold: binary masks for those words only
    _, m2, h2, w2, _ = call("GlassAttentionMaps", unet=unet, clip=clip, vae=vae, text=PROMPT, negative=negative,
                            latent_image=latent, **SETTINGS, words="circle, Blue", threshold=0.4)
    assert w2 == "circle\nblue" and m2.shape == (2, 64, 64) and set(m2.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m2[0], (masks[labels.index("circle")] >= 0.4).float())
    with pytest.raises(NodeInputError, match="'lighthouse' is not a word of the prompt"):
        call("GlassAttentionMaps", unet=unet, clip=clip, vae=vae, text=PROMPT, negative=negative,
             latent_image=latent, **SETTINGS, words="lighthouse")


def test_step_film_node(loaded):
    unet, clip, vae, negative, latent = loaded
    positive = call("GlassTextEncode", clip=clip, text=PROMPT, weighting="comfy")[0]
    film, x0, noisy, out = call("GlassStepFilm", unet=unet, positive=positive, negative=negative, vae=vae,
                                latent_image=latent, **SETTINGS)
    steps = SETTINGS["steps"]
    assert x0.shape == noisy.shape == (steps, 64, 64, 3)
    assert film.shape[0] == steps and film.shape[2] == 2 * 128 + 4 and film.shape[1] > 128
    plain = call("GlassKSampler", unet=unet, positive=positive, negative=negative, latent_image=latent, **SETTINGS)[0]
    assert torch.equal(out["samples"], plain["samples"])  # filming changes nothing
    # the x0 estimate converges to the picture; the first noisy frame is far from it
    final = call("GlassVAEDecode", samples=plain, vae=vae)[0][0]
    err = [(x0[s] - final).abs().mean().item() for s in range(steps)]
    assert err[-1] < err[0] and (noisy[0] - final).abs().mean() > (noisy[-1] - final).abs().mean()
    assert not torch.equal(film[0], film[1])  # each frame has its own step and sigma


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_save_animation(tmp_path, fmt):
    frames = torch.rand(3, 20, 24, 3)
    with runtime.settings_override(output_dir=tmp_path):
        with outputs.transaction():
            ui = call("GlassSaveAnimation", images=frames, filename_prefix="sub/film", format=fmt, fps=5.0, loop=0)
            assert os.listdir(tmp_path / "sub") == [] or all(n.startswith(".glass-") for n in os.listdir(tmp_path / "sub"))
        entry = ui["ui"]["images"][0]
        assert entry == {"filename": f"film_00001_.{fmt}", "subfolder": "sub", "type": "output"}
        with Image.open(tmp_path / "sub" / entry["filename"]) as im:
            assert im.n_frames == 3 and im.size == (24, 20)
            if fmt == "gif":  # (Pillow's WebP reader does not report frame durations)
                im.seek(1)
                assert im.info.get("duration") == 200  # 5 frames per second
        ui2 = call("GlassSaveAnimation", images=frames, filename_prefix="sub/film", format=fmt, fps=5.0, loop=0)
        assert ui2["ui"]["images"][0]["filename"] == f"film_00002_.{fmt}"  # never overwritten
        # a failed run leaves nothing
        with pytest.raises(RuntimeError):
            with outputs.transaction():
                call("GlassSaveAnimation", images=frames, filename_prefix="sub/film", format=fmt, fps=5.0, loop=0)
                raise RuntimeError("a later node failed")
        assert sorted(os.listdir(tmp_path / "sub")) == [f"film_00001_.{fmt}", f"film_00002_.{fmt}"]
    with pytest.raises(NodeInputError, match="fps"):
        call("GlassSaveAnimation", images=frames, filename_prefix="x", format=fmt, fps=0.0, loop=0)
