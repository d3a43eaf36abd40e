"""Attention maps (sd_core/attention_maps.py) on the built-in model, judged against the pixels it paints and
against an explicit computation; recording off changes nothing, recording on changes nothing either."""
import numpy as np
import pytest
import torch

from glass_diffusion.sd_core import attention_maps as am
from glass_diffusion.sd_core import builtin, toy_data, unet as unet_mod
from glass_diffusion.sd_core.attention import attention
from glass_diffusion.sd_core.conditioning import encode_prompt
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.sampling import SampleRequest, sample

from _scorer import FG_THRESHOLD, analyse

N = 64  # prompt/seed pairs, one batched run (each latent has its own noise)
SETTINGS = dict(steps=builtin.DEFAULTS["steps"], cfg=builtin.DEFAULTS["cfg"],
                sampler_name=builtin.DEFAULTS["sampler_name"], scheduler=builtin.DEFAULTS["scheduler"])


@pytest.fixture(scope="module")
def tiny():
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    model, tok = builtin.load(dtype=torch.float32)
    yield model, tok
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


def _batch_cond(model, tok, prompts):
    """One CONDITIONING entry for a batch of prompts (row i = prompt i) and each prompt's words."""
    parsed = [am.prompt_words(p, tok, width=model.clip.config.width) for p in prompts]
    conds = [encode_prompt(model.clip, tok, p, windows=w)[0] for p, (w, _) in zip(prompts, parsed)]
    z = torch.cat([c[0] for c in conds])
    pooled = torch.cat([c[1]["pooled_output"] for c in conds])
    return [[z, {"pooled_output": pooled}]], [words for _, words in parsed]


def _images(model, samples):
    images = ((model.vae.decode(samples) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return (images * 255).round().byte().numpy()


@pytest.fixture(scope="module")
def recorded(tiny):
    model, tok = tiny
    scenes = toy_data.evaluation_scenes(N, seed=5)
    positive, words = _batch_cond(model, tok, [s.caption() for s in scenes])
    negative = encode_prompt(model.clip, tok, "")
    handle = DiffusionModel.from_checkpoint(model)
    latent = {"samples": torch.zeros(N, 4, 8, 8)}
    request = SampleRequest(seed=100, **SETTINGS)
    recorder = am.AttentionRecorder(positive[0][0], N, (8, 8))
    with recorder:
        out = sample(handle, positive, negative, latent, request)
    plain = sample(handle, positive, negative, latent, request)
    return dict(scenes=scenes, words=words, recorder=recorder, samples=out["samples"], plain=plain["samples"],
                images=_images(model, out["samples"]))


def _cell_shares(m: np.ndarray) -> np.ndarray:
    """Share of a map's mass in each cell of the 3x3 grid, cells as the scorer places a shape ([3, 3])."""
    H, W = m.shape
    rows = np.minimum((np.arange(H) / (H / 3.0)).astype(int), 2)
    cols = np.minimum((np.arange(W) / (W / 3.0)).astype(int), 2)
    out = np.zeros((3, 3))
    np.add.at(out, (rows[:, None].repeat(W, 1), cols[None, :].repeat(H, 0)), m)
    return out / max(out.sum(), 1e-12)


def _background_mask(image: np.ndarray) -> np.ndarray:
    """Pixels near the background colour (the scorer's rule: median of the border, RGB distance)."""
    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    return np.linalg.norm(img - np.median(border, axis=0), axis=-1) <= FG_THRESHOLD


def test_shape_word_peaks_in_the_shapes_cell(recorded):
    maps = recorded["recorder"].token_maps((64, 64))
    hits, argmax_hits, judged = 0, 0, 0
    for i, (scene, words) in enumerate(zip(recorded["scenes"], recorded["words"])):
        got = analyse(recorded["images"][i])
        if got["row"] is None:
            continue
        judged += 1
        shape = next(w for w in words if w.text == scene.shape)
        m = am.word_maps(maps[i:i + 1], [shape])[0, 0].numpy()
        shares = _cell_shares(m)
        hits += tuple(np.unravel_index(shares.argmax(), shares.shape)) == (got["row"], got["col"])
        y, x = np.unravel_index(m.argmax(), m.shape)
        argmax_hits += (min(int(y / (64 / 3)), 2), min(int(x / (64 / 3)), 2)) == (got["row"], got["col"])
    print(f"\nshape word's map: largest cell share in the shape's cell {hits}/{judged}, "
          f"pixel argmax {argmax_hits}/{judged} ({N} pairs)")
    assert judged >= 0.9 * N
    assert hits >= 0.8 * judged


def test_background_word_covers_the_background(recorded):
    maps = recorded["recorder"].token_maps((64, 64))
    bg_shares, shape_shares = [], []
    for i, (scene, words) in enumerate(zip(recorded["scenes"], recorded["words"])):
        k = next(j for j, w in enumerate(words) if w.text == "background")
        colour = words[k - 1]
        assert colour.text == scene.background
        shape = next(w for w in words if w.text == scene.shape)
        bg = _background_mask(recorded["images"][i])
        m_bg, m_shape = am.word_maps(maps[i:i + 1], [colour, shape])[0].numpy()
        bg_shares.append((m_bg * bg).sum() / m_bg.sum())
        shape_shares.append((m_shape * bg).sum() / m_shape.sum())
    bg_shares, shape_shares = np.array(bg_shares), np.array(shape_shares)
    more = float(np.mean(bg_shares > shape_shares))
    print(f"\nbackground colour word's map on background pixels: mean {bg_shares.mean():.1%}, "
          f"min {bg_shares.min():.1%}; shape word's: mean {shape_shares.mean():.1%}; the colour word's share is "
          f"the larger in {more:.0%} of the pictures")
    assert bg_shares.mean() >= 0.85 and bg_shares.min() >= 0.7
    # the map follows the word, not only the picture's layout (a shape covers a small part of any picture)
    assert more >= 0.8


def test_recording_leaves_the_picture_unchanged(recorded):
    assert torch.equal(recorded["samples"], recorded["plain"])
    rec = recorded["recorder"]
    assert list(rec.sums) == [(4, 4)]  # glass-tiny's cross-attention runs at 4x4 only
    layers = sum(isinstance(m, unet_mod.CrossAttention) for m in builtin.load()[0].unet.modules()) // 2
    assert rec.calls == layers * SETTINGS["steps"]  # euler: one UNet call per step, every cross-attention layer
    assert torch.equal(rec.counts[(4, 4)], torch.full((N,), float(rec.calls), dtype=torch.float64))


def _forward_before(self, x, context=None):
    """CrossAttention.forward as it was before attention maps existed."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    return self.to_out(attention(q, k, v, self.heads, upcast=self.fp32))


def _hooks(module):
    from torch.nn.modules import module as nn_module
    local = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    return local + len(nn_module._global_forward_hooks) + len(nn_module._global_forward_pre_hooks)


def test_recording_off_is_the_code_before_bitwise_and_runs_the_same_ops(tiny, monkeypatch):
    model, tok = tiny
    positive, _ = _batch_cond(model, tok, ["a red circle in the center on a blue background",
                                           "a large green square at the top left on a white background"])
    negative = encode_prompt(model.clip, tok, "")
    handle = DiffusionModel.from_checkpoint(model)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    request = SampleRequest(seed=7, **{**SETTINGS, "steps": 6})
    assert am.recording() is None
    now = sample(handle, positive, negative, latent, request)["samples"]
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.tensor([500.0] * 4), torch.cat([positive[0][0]] * 2)

    def ops():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.unet(x, t, ctx)
        return [e.name for e in prof.events()]

    ops_now, hooks_now = ops(), _hooks(model.unet)
    monkeypatch.setattr(unet_mod.CrossAttention, "forward", _forward_before)
    before = sample(handle, positive, negative, latent, request)["samples"]
    ops_before = ops()
    assert torch.equal(now, before)
    assert ops_now == ops_before and len(ops_now) > 100  # the same kernels, in the same order
    assert hooks_now == 0 and _hooks(model.unet) == 0  # no module hooks, on or off


def test_recording_on_adds_no_hook_and_keeps_the_layer_output(tiny):
    model, tok = tiny
    positive, _ = _batch_cond(model, tok, ["a red circle in the center on a blue background"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 300.0])
    ctx = torch.cat([positive[0][0], encode_prompt(model.clip, tok, "")[0][0]])
    off = model.unet(x, t, ctx)
    with am.AttentionRecorder(positive[0][0], 1, (8, 8)) as rec:
        on = model.unet(x, t, ctx)
        assert _hooks(model.unet) == 0
    assert torch.equal(off, on) and rec.calls > 0 and am.recording() is None


def _explicit(q, k, heads):
    """Mean over heads of softmax(Q K^T / sqrt(d)) in float64, written out head by head."""
    n, L, D = q.shape
    d = D // heads
    out = 0
    for h in range(heads):
        qh, kh = q[..., h * d:(h + 1) * d].double(), k[..., h * d:(h + 1) * d].double()
        s = torch.einsum("nld,ntd->nlt", qh, kh) / d ** 0.5
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        out = out + e / e.sum(dim=-1, keepdim=True)
    return out / heads  # (n, L, T)


@pytest.mark.parametrize("negative_windows", [1, 2])
def test_one_layer_equals_an_explicit_softmax(tiny, negative_windows):
    """One layer, one step: the recorded per-token map equals softmax(QK^T / sqrt(d)) computed by hand, for the
    positive row only (also when guidance repeats a 77-token context to match a 154-token negative)."""
    model, tok = tiny
    layer = model.unet.middle_block[1].transformer_blocks[0].attn2
    positive, _ = _batch_cond(model, tok, ["a small yellow triangle at the top left on a black background"])
    pos = positive[0][0]  # (1, 77, D)
    neg = encode_prompt(model.clip, tok, "a " * (60 * negative_windows))[0][0]  # 77 or 154 tokens
    assert neg.shape[1] == 77 * negative_windows
    ctx = torch.cat([pos.repeat(1, negative_windows, 1), neg])  # what guidance's batch holds
    C = layer.to_q.in_features
    x = torch.randn(2, 16, C)
    with am.AttentionRecorder(pos, 1, (8, 8)) as rec:  # latent 8x8: this layer runs at 4x4 = 16 queries
        layer(x, ctx)
    got = rec.sums[(4, 4)][0].reshape(77, 16).T  # (T, H, W) -> (HW, T)
    want = _explicit(layer.to_q(x[:1]), layer.to_k(pos), layer.heads)[0]  # the positive row, 77 tokens
    assert rec.counts[(4, 4)].tolist() == [1.0]
    assert (got.double() - want).abs().max() < 1e-5
    assert torch.allclose(got.sum(dim=1), torch.ones(16), atol=1e-5)  # probabilities over the tokens


def test_memory_is_running_sums_only(tiny):
    model, tok = tiny
    positive, _ = _batch_cond(model, tok, ["a red circle in the center on a blue background"])
    negative = encode_prompt(model.clip, tok, "")
    handle = DiffusionModel.from_checkpoint(model)
    held = []
    for steps in (2, 8):
        with am.AttentionRecorder(positive[0][0], 1, (8, 8)) as rec:
            sample(handle, positive, negative, {"samples": torch.zeros(1, 4, 8, 8)},
                   SampleRequest(seed=1, **{**SETTINGS, "steps": steps}))
        held.append(rec.memory_bytes())
    assert held[0] == held[1] == 77 * 16 * 4  # one [1, 77, 4, 4] float32 sum, whatever the steps
    # SD 1.5 at 512 px (latent 64x64, cross-attention at 64, 32, 16 and 8): from the shapes
    sd15 = am.recording_memory((64, 64), 77, levels=4)
    assert sd15 == 77 * 5440 * 4  # 1.6 MiB per picture and 77-token window
    print(f"\nrecorder memory: glass-tiny {held[0]} B per picture; SD 1.5 512 px {sd15 / 2**20:.2f} MiB per picture "
          f"and window; transient probabilities of the largest layer (8 heads x 4096 x 77 x 4 B) "
          f"{8 * 4096 * 77 * 4 / 1e6:.1f} MB")


def test_maps_are_per_picture_with_one_prompt_for_the_batch(tiny):
    """A [1, T, D] positive for a batch of 2 latents: each picture gets its own map (rows r -> picture r % B)."""
    model, tok = tiny
    positive, words = _batch_cond(model, tok, ["a large red circle on a blue background"])
    negative = encode_prompt(model.clip, tok, "")
    handle = DiffusionModel.from_checkpoint(model)
    with am.AttentionRecorder(positive[0][0], 2, (8, 8)) as rec:
        sample(handle, positive, negative, {"samples": torch.zeros(2, 4, 8, 8)},
               SampleRequest(seed=3, **{**SETTINGS, "steps": 4}))
    maps = rec.token_maps((64, 64))
    assert maps.shape == (2, 77, 64, 64)
    assert rec.counts[(4, 4)].tolist() == [rec.calls, rec.calls]
    assert not torch.equal(maps[0], maps[1])  # two noises, two pictures, two maps
    w = am.word_maps(maps, words[0])
    assert w.shape == (2, len(words[0]), 64, 64) and float(w.max()) == pytest.approx(1.0)
