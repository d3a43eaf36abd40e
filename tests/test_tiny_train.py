"""The tiny model's training code: a few steps of every stage, reproducible from the seed, resumable, and the
result loads through the package's checkpoint loader and tokenizer."""
import json

import torch

from glass_diffusion.sd_core import train_tiny
from glass_diffusion.sd_core.checkpoint import load_checkpoint
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer

FAST = ["--vae-batch", "4", "--num-latents", "32", "--batch", "4", "--save-every-s", "0"]


def _run(out, vae_steps, steps, seed=0):
    return train_tiny.main(["--out", str(out), "--seed", str(seed), "--vae-steps", str(vae_steps),
                            "--steps", str(steps), *FAST])


def _weights(path):
    sd = load_checkpoint(path).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def test_training_runs_exports_and_loads(tmp_path):
    ckpt = _run(tmp_path / "a", 2, 2)
    model = load_checkpoint(ckpt)
    cfg = model.config
    tok = CLIPTokenizer(tmp_path / "a" / "glass-tiny-bpe.txt")
    assert cfg.clip.vocab_size == tok.vocab_size
    assert (cfg.clip.bos_token_id, cfg.clip.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert cfg.clip.max_positions == 77 and cfg.unet.context_dim == cfg.clip.width
    assert cfg.vae.scaling_factor != 0.18215 and cfg.vae.scaling_factor > 0  # measured on the data
    assert ckpt.stat().st_size < 20e6
    info = json.loads((tmp_path / "a" / "train_info.json").read_text())
    assert info["config"] == json.loads(json.dumps(cfg.to_dict()))


def test_same_seed_same_model_and_interrupted_run_resumes_exactly(tmp_path):
    a = _weights(_run(tmp_path / "a", 3, 4))
    b = _weights(_run(tmp_path / "b", 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an interrupted run (stopped after diffusion step 2) resumes from its saved state to the same model
    assert train_tiny.main(["--out", str(tmp_path / "c"), "--vae-steps", "3", "--steps", "4",
                            "--stop-at-step", "2", *FAST]) is None
    assert torch.load(tmp_path / "c" / "diffusion_state.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "c" / "glass-tiny.safetensors").exists()
    c = _weights(_run(tmp_path / "c", 3, 4))
    assert all(torch.equal(a[k], c[k]) for k in a)
    d = _weights(_run(tmp_path / "d", 3, 4, seed=1))
    assert any(not torch.equal(a[k], d[k]) for k in a if k.startswith("model.diffusion_model."))


def test_vae_pixel_weights_cover_the_shape_fade_around_it_and_mark_its_outline():
    import numpy as np
    from glass_diffusion.sd_core import toy_data
    args = train_tiny.parse_args(["--out", "unused", "--fg-weight", "8", "--fg-ring", "6", "--edge-weight", "8"])
    scene = toy_data.Scene("red", "square", "large", 1, 1, "blue")  # drawn square: pixels 20..43 in x and y
    w = train_tiny.pixel_weights(toy_data.draw(scene)[None], [scene], args)[0, 0].numpy()  # (64, 64)
    assert w.shape == (64, 64)
    assert w[32, 32] == 1 + 8  # inside, away from the outline
    assert w[5, 5] == 1 and w[32, 13] == 1  # background more than 6 px from the shape
    assert w[32, 19] > 1 + 8 and w[32, 20] == 1 + 8 + 8  # either side of the edge: the outline band
    ramp = w[32, 13:19]  # from 7 px to 2 px outside the left edge: rises steadily, no jump
    assert np.all(np.diff(ramp) > 0) and np.diff(ramp).max() < 1.5
    assert np.array_equal(w, w[:, ::-1]) and np.array_equal(w, w.T)  # the square's symmetry


def test_vae_weights_without_fade_or_outline_are_v1s_shape_weighting():
    """fg_ring 0 and edge_weight 0 give what trained glass-tiny v1: 1, plus fg_weight on the shape's pixels."""
    import numpy as np
    from glass_diffusion.sd_core import toy_data
    images, _, scenes = toy_data.make_batch([3, 1], 8)
    args = train_tiny.parse_args(["--out", "unused", "--fg-ring", "0", "--edge-weight", "0"])
    bg = np.array([toy_data.COLOURS[s.background] for s in scenes], np.int16)[:, None, None]
    fg = torch.from_numpy(np.abs(images.astype(np.int16) - bg).sum(-1) > 0).float().unsqueeze(1)
    assert torch.equal(train_tiny.pixel_weights(images, scenes, args), 1.0 + args.fg_weight * fg)


def test_the_defaults_make_the_shipped_models_architecture_and_vae_channels_reach_the_file(tmp_path):
    """The documented command (all defaults) trains the shipped glass-tiny's config; --vae-channels is exported."""
    from glass_diffusion.sd_core import builtin
    shipped = load_checkpoint(builtin.CHECKPOINT).config
    ckpt = _run(tmp_path / "a", 1, 1)
    made = load_checkpoint(ckpt).config
    assert (made.unet, made.clip) == (shipped.unet, shipped.clip)
    assert {**made.vae.__dict__, "scaling_factor": 0} == {**shipped.vae.__dict__, "scaling_factor": 0}
    other = train_tiny.main(["--out", str(tmp_path / "b"), "--vae-channels", "8", "--vae-steps", "1", "--steps", "1",
                             *FAST])
    assert load_checkpoint(other).config.vae.base_channels == 8 != shipped.vae.base_channels
