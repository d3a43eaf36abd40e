"""The LoRA this repository trains (sd_core/lora_train.py, shipped as sd_core/builtin/glass-tiny-bar.safetensors):
over 64 prompt/seed pairs that use the new shape word "bar", the pixel scorer finds a bar (a shape at least 1.5
times as wide as it is tall; the grammar's circles, squares and triangles are about 1:1) in at least 80 % of the
pictures made with the LoRA and in at most 20 % of those made without it; the shipped file is small and
self-describing."""
import json

import numpy as np
import pytest
import torch

from scipy import ndimage

from _scorer import FG_THRESHOLD

from glass_diffusion.sd_core import builtin, lora, lora_train, toy_data
from glass_diffusion.sd_core.checkpoint import load_checkpoint
from glass_diffusion.sd_core.conditioning import encode_prompt
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.sampling import SampleRequest, sample
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer

LORA_FILE = builtin.BUILTIN_DIR / "glass-tiny-bar.safetensors"
shipped = pytest.mark.skipif(not LORA_FILE.is_file(), reason="built-in LoRA not shipped")
N = 64
SETTINGS = dict(steps=builtin.DEFAULTS["steps"], cfg=builtin.DEFAULTS["cfg"],
                sampler_name=builtin.DEFAULTS["sampler_name"], scheduler=builtin.DEFAULTS["scheduler"])
BAR_ASPECT = 1.5  # width / height of the shape's bounding box that counts as a bar


def aspect(image) -> float:
    """Width / height of the largest foreground region's bounding box (the scorer's foreground rule:
    pixels far from the border's median colour); 0 when there is no shape."""
    img = np.asarray(image, np.float32)[..., :3]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    fg = np.linalg.norm(img - np.median(border, axis=0), axis=-1) > FG_THRESHOLD  # (H, W)
    labels, n = ndimage.label(fg)
    if n == 0:
        return 0.0
    region = labels == (int(np.bincount(labels.ravel())[1:].argmax()) + 1)
    if region.sum() < 10:  # specks are not a shape
        return 0.0
    ys, xs = np.nonzero(region)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


def is_bar(image) -> bool:
    return aspect(image) >= BAR_ASPECT


def prompts_and_seeds():
    rng = np.random.default_rng(2026)
    out = []
    for i in range(N):
        scene = lora_train.new_word_scene(rng)
        out.append((scene.caption(say_size=bool(i % 2), say_position=bool(i % 3)), 1000 + i))
    return out


@pytest.fixture(scope="module")
def tiny():
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    model = load_checkpoint(builtin.CHECKPOINT, dtype=torch.float32).eval()
    yield model, CLIPTokenizer(builtin.VOCABULARY)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


def generate(handle, clip, vae, tok, pairs):
    """Each prompt at its own seed (one KSampler run per pair, batch 1); handle: a DiffusionModel."""
    images = []
    negative = encode_prompt(clip, tok, "")
    for prompt, seed in pairs:
        out = sample(handle, encode_prompt(clip, tok, prompt), negative, {"samples": torch.zeros(1, 4, 8, 8)},
                     SampleRequest(seed=seed, **SETTINGS))
        x = vae.decode(out["samples"])  # (1, 4, 8, 8) -> (1, 3, 64, 64)
        images.append((((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0] * 255).round().byte().numpy())
    return images


@shipped
def test_shipped_lora_is_small_and_self_describing():
    assert LORA_FILE.stat().st_size <= 2_000_000
    tensors, meta = lora.read_lora_file(LORA_FILE)
    assert meta["glass_diffusion.concept"] == "bar" and meta["ss_base_model_version"] == "glass-tiny"
    training = json.loads(meta["glass_diffusion.training"])
    assert {"seed", "steps", "rank", "lr"} <= set(training)
    card = builtin.BUILTIN_DIR / "glass-tiny-bar.md"
    assert "lora_train" in card.read_text()


def test_new_word_is_not_one_known_token():
    tok = CLIPTokenizer(builtin.VOCABULARY)
    assert "bar" not in toy_data.grammar_words()
    assert len(tok.encode("bar")) > 1  # byte-level BPE pieces, not a word glass-tiny has seen


def test_scorer_tells_bars_from_the_grammar_shapes():
    rng = np.random.default_rng(5)
    bars = [lora_train.draw(lora_train.new_word_scene(rng)) for _ in range(32)]
    others = [toy_data.draw(toy_data.random_scene(rng)) for _ in range(32)]
    assert all(is_bar(im) for im in bars) and not any(is_bar(im) for im in others)


@shipped
def test_lora_teaches_the_new_shape(tiny, record_property):
    import hashlib
    _, meta = lora.read_lora_file(LORA_FILE)
    assert hashlib.sha256(builtin.CHECKPOINT.read_bytes()).hexdigest() == meta["glass_diffusion.base_model_sha256"], (
        "the shipped LoRA was trained on another glass-tiny: retrain it with sd_core/lora_train.py")
    model, tok = tiny
    unet_patch, clip_patch = lora.load_lora(LORA_FILE, model.unet, model.clip)
    plain = DiffusionModel.from_checkpoint(model)
    patched = plain.with_patches((unet_patch,))  # the patch layer of the model handle
    clip = lora.patched_module(model.clip, [clip_patch])
    pairs = prompts_and_seeds()
    with_lora = [aspect(im) for im in generate(patched, clip, model.vae, tok, pairs)]
    without = [aspect(im) for im in generate(plain, model.clip, model.vae, tok, pairs)]
    rate_with = sum(a >= BAR_ASPECT for a in with_lora) / N
    rate_without = sum(a >= BAR_ASPECT for a in without) / N
    record_property("bar_with_lora", rate_with)
    record_property("bar_without_lora", rate_without)
    print(f"bars: {rate_with:.0%} with the LoRA, {rate_without:.0%} without ({N} prompt/seed pairs)")
    assert rate_with >= 0.8, with_lora
    assert rate_without <= 0.2, without
