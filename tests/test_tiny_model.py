"""End-to-end checks of the built-in tiny model (sd_core/builtin/glass-tiny.safetensors) through the package's
own loader, tokenizer, conditioning and samplers, judged by the pixel-statistics scorer (tests/_scorer.py)."""
import json

import numpy as np
import pytest
import torch

from glass_diffusion.sd_core import builtin, toy_data
from glass_diffusion.sd_core.checkpoint import CONFIG_METADATA_KEY, load_checkpoint
from glass_diffusion.sd_core.conditioning import encode_prompt
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.sampling import SampleRequest, img2img, inpaint, sample, txt2img
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer

from _scorer import analyse, centre_spread, diversity, scene_want, score, summarise

pytestmark = pytest.mark.skipif(not builtin.CHECKPOINT.is_file(), reason="built-in model not shipped")

SETTINGS = dict(steps=builtin.DEFAULTS["steps"], cfg=builtin.DEFAULTS["cfg"],
                sampler_name=builtin.DEFAULTS["sampler_name"], scheduler=builtin.DEFAULTS["scheduler"])
N_PROMPTS = 72  # prompt/seed pairs of seen colour-shape combinations
N_HELD_OUT = 24
# glass-tiny v1 (the model v2 replaced), measured by these tests on the same prompts and seeds: the v2 retrain
# (issue 9) had to keep its colour and position accuracy and double its variation between seeds
V1_SEEN = {"colour": 68 / 72, "position": 1.0, "shape": 46 / 72}
V1_HELD_OUT = {"colour": 22 / 24, "position": 23 / 24, "shape": 11 / 24}
V1_DIVERSITY, V1_CENTRE_SPREAD = 3.19, 1.26  # test_seeds_vary's figures (pixel distance 0..255, px)


@pytest.fixture(scope="module")
def tiny():
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two on a busy machine
    model = load_checkpoint(builtin.CHECKPOINT, dtype=torch.float32).eval()
    yield model, CLIPTokenizer(builtin.VOCABULARY)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


def to_uint8(images) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().numpy()  # (B, H, W, 3) 0..1 -> uint8


def generate(tiny, prompt, seed):
    model, tok = tiny
    return to_uint8(txt2img(model, tok, prompt, width=64, height=64, seed=seed, **SETTINGS))[0]


def generate_batch(tiny, prompts, seed):
    """One KSampler run over a batch whose rows have different prompts (row i: noise of batch index i)."""
    model, tok = tiny
    conds = [encode_prompt(model.clip, tok, p)[0] for p in prompts]
    positive = [[torch.cat([z for z, _ in conds]), {"pooled_output": torch.cat([d["pooled_output"] for _, d in conds])}]]
    negative = encode_prompt(model.clip, tok, "")
    latent = {"samples": torch.zeros(len(prompts), 4, 8, 8)}
    out = sample(DiffusionModel.from_checkpoint(model), positive, negative, latent,
                 SampleRequest(seed=seed, **SETTINGS))
    images = model.vae.decode(out["samples"])  # (B, 4, 8, 8) -> (B, 3, 64, 64)
    return to_uint8(((images + 1) / 2).permute(0, 2, 3, 1))


def test_shipped_files_are_small_and_self_describing():
    files = [builtin.CHECKPOINT, builtin.VOCABULARY]
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    assert builtin.MODEL_CARD.is_file()
    from safetensors import safe_open
    with safe_open(str(builtin.CHECKPOINT), "pt") as f:
        meta = json.loads(f.metadata()[CONFIG_METADATA_KEY])
        keys = list(f.keys())
    assert meta["clip"]["vocab_size"] == CLIPTokenizer(builtin.VOCABULARY).vocab_size
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)


def test_grammar_words_are_single_tokens(tiny):
    _, tok = tiny
    for w in toy_data.grammar_words():
        assert len(tok.encode(w)) == 1, w


def _score_scenes(tiny, scenes, seed):
    images = generate_batch(tiny, [s.caption() for s in scenes], seed)
    return summarise([score(img, scene_want(s)) for img, s in zip(images, scenes)])


def test_txt2img_follows_the_prompt(tiny, record_property):
    """Colour, position and shape of the largest non-background region, on seen colour-shape pairs and on the
    pairs never drawn in training: shape >= 85 % seen and >= 75 % held out, colour and position at least v1's."""
    seen = _score_scenes(tiny, toy_data.evaluation_scenes(N_PROMPTS, seed=1234), seed=1000)
    held = _score_scenes(tiny, toy_data.evaluation_scenes(N_HELD_OUT, seed=1234, held_out=True), seed=5000)
    report = {"seen": seen, "held_out": held}
    record_property("tiny_scores", json.dumps(report))
    print("\nglass-tiny scorer:", json.dumps(report))
    assert seen["n"] == N_PROMPTS and held["n"] == N_HELD_OUT
    assert seen["shape"] >= 0.85 and held["shape"] >= 0.75, report
    for key in ("colour", "position"):
        assert seen[key] >= V1_SEEN[key] and held[key] >= V1_HELD_OUT[key], (key, report)


def test_seeds_vary(tiny, record_property):
    """Seeds move the shape about its cell as the training data does: the shape centres of one prompt's pictures
    lie at least twice as far apart as v1's (mean over seed pairs), the pixels differ more than v1's, and the
    pictures of every seed still follow the prompt."""
    scenes = toy_data.evaluation_scenes(24, seed=4321)
    images = np.stack([generate_batch(tiny, [s.caption() for s in scenes], seed) for seed in range(4)])  # (S, N, H, W, 3)
    acc = summarise([score(img, scene_want(s)) for per_seed in images for img, s in zip(per_seed, scenes)])
    report = {"centre_spread": centre_spread(images), "diversity": diversity(images), "accuracy": acc}
    record_property("tiny_seed_variation", json.dumps(report))
    print("\nglass-tiny seed variation:", json.dumps(report))
    assert report["centre_spread"] >= 2 * V1_CENTRE_SPREAD, report
    assert report["diversity"] > V1_DIVERSITY, report
    assert acc["colour"] >= 0.85 and acc["position"] >= 0.95, report


def test_batched_rows_match_single_runs(tiny):
    """The batched scorer run gives each row the picture txt2img gives for that prompt alone."""
    p = "a large green square at the top right on a black background"
    batch = generate_batch(tiny, [p, "a red circle"], seed=7)
    single = generate(tiny, p, 7)
    assert np.abs(batch[0].astype(int) - single.astype(int)).max() <= 2


def test_different_seeds_give_different_pictures(tiny):
    p = "a small red circle in the center on a blue background"
    a, b = generate(tiny, p, 1), generate(tiny, p, 2)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0
    assert np.array_equal(a, generate(tiny, p, 1))


def test_img2img_changes_the_colour_as_prompted(tiny):
    model, tok = tiny
    src = toy_data.Scene("red", "square", "large", 1, 1, "blue")
    image = torch.from_numpy(toy_data.draw(src)).float().div(255).unsqueeze(0)  # (1, 64, 64, 3)
    want = {"colour": "green", "shape": None, "row": 1, "col": 1}
    hits, keeps = 0, 0
    for seed in range(4):
        out = to_uint8(img2img(model, tok, image, "a large green square in the center on a blue background",
                               denoise=0.7, seed=seed, **SETTINGS))[0]
        hits += bool(score(out, want)["colour"])
        same = to_uint8(img2img(model, tok, image, "a large red square in the center on a blue background",
                                denoise=0.7, seed=seed, **SETTINGS))[0]
        keeps += analyse(same)["colour"] == "red"
    assert hits >= 3, f"green in {hits}/4"
    assert keeps >= 3, f"red kept in {keeps}/4"


def test_inpainting_changes_only_the_masked_region(tiny):
    """The masked quarter holds the picture's shape; inpainting replaces it with the prompted one and keeps the
    rest. (glass-tiny only ever saw one shape per picture: asked to add a second shape beside a kept one, v2
    draws at most a faint one, so the test repaints the shape itself.)"""
    model, tok = tiny
    src = toy_data.Scene("red", "square", "large", 2, 2, "white")  # pixels 40..63: inside the mask below
    image = torch.from_numpy(toy_data.draw(src)).float().div(255).unsqueeze(0)  # (1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 32:, 32:] = 1.0  # repaint the bottom right quarter (whole latent pixels)
    prompt = "a large green circle at the bottom right on a white background"
    # latent level: outside the mask the sampled latent is the encoded original, exactly
    x = image.permute(0, 3, 1, 2) * 2 - 1  # (1, H, W, 3) 0..1 -> (1, 3, H, W) -1..1
    encoded = model.vae.encode(x).mode()  # (1, 4, 8, 8)
    out = sample(DiffusionModel.from_checkpoint(model), encode_prompt(model.clip, tok, prompt),
                 encode_prompt(model.clip, tok, ""), {"samples": encoded, "noise_mask": mask},
                 SampleRequest(seed=3, **SETTINGS))["samples"]
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[4:, 4:] = False
    assert torch.allclose(out[..., keep], encoded[..., keep], atol=1e-5)
    assert (out[..., ~keep] - encoded[..., ~keep]).abs().mean() > 0.1
    # pixel level, through the high-level helper: the background outside is kept, the new shape replaces the
    # old one inside (the decoder's GroupNorm and attention see the whole latent, so pixels outside the mask
    # may shift slightly, far less than inside)
    img = to_uint8(inpaint(model, tok, image, mask, prompt, seed=3, **SETTINGS))[0]
    roundtrip = to_uint8(((model.vae.decode(encoded) + 1) / 2).permute(0, 2, 3, 1))[0]
    diff = np.abs(img.astype(int) - roundtrip.astype(int)).mean(axis=-1)  # (H, W)
    outside = np.ones((64, 64), bool)
    outside[32:, 32:] = False
    assert diff[outside].mean() < 0.5 * diff[~outside].mean(), (diff[outside].mean(), diff[~outside].mean())
    assert analyse(img[:32, :32])["colour"] is None and analyse(img)["background"] == "white"
    inside = analyse(img[32:, 32:])
    assert (inside["colour"], inside["shape"]) == ("green", "circle"), inside


def test_builtin_command_writes_pngs(tiny, tmp_path):
    from PIL import Image

    from glass_diffusion.sd_core.builtin.__main__ import main
    paths = main(["--out", str(tmp_path), "--scale", "1", "a large yellow circle in the center on a purple background"])
    assert len(paths) == 1 and paths[0].suffix == ".png"
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert img.shape == (64, 64, 3)
    got = analyse(img)
    assert (got["colour"], got["row"], got["col"]) == ("yellow", 1, 1), got
