"""SD 2.x LoRA files on the tiny SD 2.x model: text-encoder keys in Hugging Face names land on OpenCLIP's modules
(q, k, v on the row blocks of the packed in_proj), every patch kind on a row block (LoRA, LoHa, LoKr, diff /
diff_b, DoRA normalising the block), fp32 arithmetic cast to the weight's dtype, strength 0 and the
copy-on-write view; and SD 1.x / SD 2.x files on the other family's model refused with the mismatch named,
nothing applied (full-size shapes on the meta device: no memory). Parity against diffusers and lycoris-lora is
in test_lora_parity.py (test_lora_parity_tiny_sd2)."""
import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from _lora_util import clip_to_hf, random_lowrank

from glass_diffusion.sd_core import lora
from glass_diffusion.sd_core.family import SD1, SD2
from glass_diffusion.sd_core.lora import LoraError
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.random_weights import build_random

HF = "text_model.encoder.layers.{i}.{m}"
TE = "lora_te_text_model_encoder_layers_{i}_{m}"


@pytest.fixture(scope="module")
def tiny2():
    return build_random(SDConfig.tiny_sd2(), seed=3, family=SD2)


def _save(tmp_path, tensors, name="l.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lowrank(key, shape, seed, rank=2, alpha=None):
    up, down = random_lowrank(torch.Generator().manual_seed(seed), shape, rank)
    t = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
    if alpha is not None:
        t[f"{key}.alpha"] = torch.tensor(float(alpha))
    return t, up, down


def test_open_clip_names_match_diffusers_converter(tiny2):
    """Our structural Hugging Face names for OpenCLIP, and their row blocks, are those diffusers' own
    single-file converter gives the same tensors."""
    clip = tiny2.clip
    hf = clip_to_hf(clip.state_dict(), tiny2.config)
    slots = lora.hf_clip_slots(clip)
    ours = {f"{name}.{p}" for name, slot in slots.items() for p, _, _ in slot.params
            if isinstance(getattr(clip.get_submodule(slot.module), slot.target(p)[0], None), torch.Tensor)}
    # position table and projection are bare parameters (no module, nothing a LoRA names)
    assert ours == set(hf) - {"text_model.embeddings.position_embedding.weight", "text_projection.weight"}
    for name, slot in slots.items():
        for p, param, rows in slot.params:
            t = getattr(clip.get_submodule(slot.module), param, None)
            if t is not None:
                assert torch.equal(t if rows is None else t[rows[0]:rows[1]], hf[f"{name}.{p}"]), name
    assert len(slots) == 3 * 8 + 2  # per layer: q, k, v, out_proj, fc1, fc2, two norms


def test_every_patch_kind_on_a_row_block(tiny2, tmp_path):
    """q: LoRA with alpha, k: LoHa, v: LoKr + diff_b on v's bias rows, out_proj: plain; strength 0.7."""
    clip = tiny2.clip
    W = clip.config.width
    g = torch.Generator().manual_seed(7)
    t, up, down = _lowrank(TE.format(i=1, m="self_attn_q_proj"), (W, W), seed=1, alpha=1.0)
    k = TE.format(i=1, m="self_attn_k_proj")
    hada = {n: torch.randn(s, generator=g) * 0.3 for n, s in
            (("hada_w1_a", (W, 2)), ("hada_w1_b", (2, W)), ("hada_w2_a", (W, 2)), ("hada_w2_b", (2, W)))}
    t.update({f"{k}.{n}": v for n, v in hada.items()})
    t[f"{k}.alpha"] = torch.tensor(4.0)
    v = TE.format(i=1, m="self_attn_v_proj")
    w1, w2 = torch.randn(2, 4, generator=g), torch.randn(W // 2, W // 4, generator=g) * 0.1
    t[f"{v}.lokr_w1"], t[f"{v}.lokr_w2"] = w1, w2
    t[f"{v}.diff_b"] = torch.randn(W, generator=g) * 0.1
    o, o_up, o_down = _lowrank(TE.format(i=1, m="self_attn_out_proj"), (W, W), seed=2)
    t.update(o)
    _, patch = lora.load_lora(_save(tmp_path, t), tiny2.unet, clip, 1.0, 0.7)
    attn = clip.transformer.resblocks[1].attn
    w, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    assert set(patch.adapters) == {f"transformer.resblocks.1.attn.in_proj_weight[{a}:{a + W}]" for a in (0, W, 2 * W)} \
        | {f"transformer.resblocks.1.attn.in_proj_bias[{2 * W}:{3 * W}]", "transformer.resblocks.1.attn.out_proj.weight"}
    view = lora.patched_module(clip, [patch])
    got = view.transformer.resblocks[1].attn
    want = w.clone()
    want[:W] += 0.7 * 0.5 * (up @ down)
    want[W:2 * W] += 0.7 * 2.0 * (hada["hada_w1_a"] @ hada["hada_w1_b"]) * (hada["hada_w2_a"] @ hada["hada_w2_b"])
    want[2 * W:] += 0.7 * torch.kron(w1, w2)
    torch.testing.assert_close(got.in_proj_weight, want, rtol=1e-6, atol=1e-7)
    want_b = b.clone()
    want_b[2 * W:] += 0.7 * t[f"{v}.diff_b"]
    torch.testing.assert_close(got.in_proj_bias, want_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.out_proj.weight, attn.out_proj.weight + 0.7 * o_up @ o_down, rtol=1e-6, atol=1e-7)
    # the view runs and encodes differently; the loaded encoder is unchanged and shares every other tensor
    ids = torch.tensor([[clip.config.bos_token_id, 5, 6, clip.config.eos_token_id] + [0] * 3])
    assert not torch.allclose(view(ids).z, clip(ids).z)
    assert torch.equal(attn.in_proj_weight, w) and attn.in_proj_weight is not got.in_proj_weight
    loaded, patched = clip.state_dict(), view.state_dict()
    new = {k for k in loaded if loaded[k].data_ptr() != patched[k].data_ptr()}
    assert new == {"transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_bias",
                   "transformer.resblocks.1.attn.out_proj.weight"}
    assert lora.patched_module(clip, [patch.with_strength(0.0)]) is clip


def test_row_block_dora_and_dtype(tiny2, tmp_path):
    """DoRA on k's rows normalises the block (the weight diffusers / ComfyUI see as k_proj); an fp16 encoder
    gets the fp32 result cast once."""
    clip = tiny2.clip
    W = clip.config.width
    key = TE.format(i=0, m="self_attn_k_proj")
    t, up, down = _lowrank(key, (W, W), seed=4, alpha=2.0)
    for axis, shape in (("out", (W, 1)), ("in", (1, W))):
        block = clip.transformer.resblocks[0].attn.in_proj_weight.detach()[W:2 * W]
        merged = block + up @ down
        m = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5
        dim = 1 if axis == "out" else 0
        want = merged * (m / (merged.norm(dim=dim, keepdim=True) + torch.finfo(torch.float32).eps))
        path = _save(tmp_path, {**t, f"{key}.dora_scale": m}, f"dora_{axis}.safetensors")
        _, patch = lora.load_lora(path, None, clip)
        got = lora.patched_module(clip, [patch]).transformer.resblocks[0].attn.in_proj_weight
        torch.testing.assert_close(got[W:2 * W], want, rtol=1e-6, atol=1e-7)
        assert torch.equal(got[:W], clip.transformer.resblocks[0].attn.in_proj_weight[:W])
    half = copy.deepcopy(clip).half()
    _, patch = lora.load_lora(_save(tmp_path, t), None, half)
    got = lora.patched_module(half, [patch]).transformer.resblocks[0].attn.in_proj_weight
    w = half.transformer.resblocks[0].attn.in_proj_weight.float()
    assert got.dtype == torch.float16
    assert torch.equal(got[W:2 * W], (w[W:2 * W] + up @ down).half())  # alpha 2 = rank: scale 1


def test_spellings_of_text_encoder_keys(tiny2, tmp_path, caplog):
    """kohya (lora_te_ / lora_te1_), diffusers / PEFT (text_encoder.*.lora_A/B), the older
    lora_linear_layer, and ComfyUI's generic text_encoders.clip_h.transformer.* all give one patch."""
    clip = tiny2.clip
    W = clip.config.width
    _, up, down = _lowrank("x", (W, W), seed=6)
    hf = HF.format(i=2, m="self_attn.v_proj")
    spellings = {
        "kohya": {f"lora_te_{hf.replace('.', '_')}.lora_up.weight": up,
                  f"lora_te_{hf.replace('.', '_')}.lora_down.weight": down},
        "kohya_te1": {f"lora_te1_{hf.replace('.', '_')}.lora_up.weight": up,
                      f"lora_te1_{hf.replace('.', '_')}.lora_down.weight": down},
        "peft": {f"text_encoder.{hf}.lora_B.weight": up, f"text_encoder.{hf}.lora_A.weight": down},
        "linear_layer": {f"text_encoder.{hf}.lora_linear_layer.up.weight": up,
                         f"text_encoder.{hf}.lora_linear_layer.down.weight": down},
        "comfy_generic": {f"text_encoders.clip_h.transformer.{hf}.lora_up.weight": up,
                          f"text_encoders.clip_h.transformer.{hf}.lora_down.weight": down},
    }
    results = []
    with caplog.at_level(logging.WARNING, logger=lora.log.name):
        for name, tensors in spellings.items():
            _, patch = lora.load_lora(_save(tmp_path, tensors, f"{name}.safetensors"), tiny2.unet, clip)
            results.append(lora.patched_module(clip, [patch]).transformer.resblocks[2].attn.in_proj_weight)
    assert not [r for r in caplog.records if r.name == lora.log.name], caplog.text
    w = clip.transformer.resblocks[2].attn.in_proj_weight
    torch.testing.assert_close(results[0][2 * W:], w[2 * W:] + up @ down, rtol=1e-6, atol=1e-7)
    assert torch.equal(results[0][:2 * W], w[:2 * W])
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ------------------------------------------------------------------------------------------ family mismatch

@pytest.fixture(scope="module")
def full_models():
    """Full-size SD 1.5 and SD 2.x networks on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return {"sd1": StableDiffusion(SDConfig.sd15(), SD1), "sd2": StableDiffusion(SDConfig.sd2(), SD2)}


def _family_file(tmp_path, family, te=True, unet=True):
    """A small random LoRA with a family's real widths: text-encoder q_proj / fc1 of layer 0 (768 for SD 1.x,
    1024 for SD 2.x), cross-attention to_k / to_v of the first transformer (context 768 / 1024)."""
    text, ctx = {"sd1": (768, 768), "sd2": (1024, 1024)}[family]
    t = {}
    if te:
        for i, (m, shape) in enumerate((("self_attn_q_proj", (text, text)), ("mlp_fc1", (4 * text, text)))):
            t.update(_lowrank(TE.format(i=0, m=m), shape, seed=i, rank=1, alpha=1.0)[0])
    if unet:
        for i, m in enumerate(("attn2_to_k", "attn2_to_v", "attn1_to_q")):
            shape = (320, ctx if "attn2" in m else 320)
            t.update(_lowrank(f"lora_unet_input_blocks_1_1_transformer_blocks_0_{m}", shape, seed=10 + i, rank=1)[0])
    return _save(tmp_path, t, f"{family}_{'te' if te else ''}{'unet' if unet else ''}.safetensors")


@pytest.mark.parametrize("family, model, te, unet, expect", [
    ("sd1", "sd2", True, True, ("768 wide (SD 1.x's CLIP ViT-L/14)", "1024 wide (SD 2.x's OpenCLIP ViT-H/14)",
                                "context 768 wide (SD 1.x)", "context is 1024 wide (SD 2.x)")),
    ("sd1", "sd2", False, True, ("context 768 wide (SD 1.x)", "context is 1024 wide (SD 2.x)")),
    ("sd1", "sd2", True, False, ("768 wide (SD 1.x's CLIP ViT-L/14)",)),
    ("sd2", "sd1", True, True, ("1024 wide (SD 2.x's OpenCLIP ViT-H/14)", "768 wide (SD 1.x's CLIP ViT-L/14)",
                                "context 1024 wide (SD 2.x)", "context is 768 wide (SD 1.x)")),
])
def test_other_familys_lora_is_refused(full_models, tmp_path, family, model, te, unet, expect):
    path = _family_file(tmp_path, family, te, unet)
    m = full_models[model]
    with pytest.raises(LoraError) as e:
        lora.load_lora(path, m.unet, m.clip)
    msg = str(e.value)
    assert path.name in msg and "another model family" in msg and "nothing of it is applied" in msg, msg
    for part in expect:
        assert part in msg, msg
    # the same family's file fits
    (tmp_path / "own").mkdir()
    own = _family_file(tmp_path / "own", model, te, unet)
    unet_patch, clip_patch = lora.load_lora(own, m.unet, m.clip)
    assert (unet_patch is not None) == unet and (clip_patch is not None) == te


def test_mismatch_within_the_family_is_not_called_a_family(tiny2, tmp_path):
    """A wrong shape on a module whose widths agree with the model stays the plain shape error."""
    W = tiny2.clip.config.width
    t, _, _ = _lowrank(TE.format(i=0, m="self_attn_q_proj"), (W, W), seed=1)
    t[TE.format(i=0, m="self_attn_q_proj") + ".lora_up.weight"] = torch.randn(W + 1, 2)
    with pytest.raises(LoraError) as e:
        lora.load_lora(_save(tmp_path, t, "bad.safetensors"), tiny2.unet, tiny2.clip)
    assert "bad.safetensors" in str(e.value) and "another model family" not in str(e.value)


# ------------------------------------------------------------------------------------------ full size

@pytest.mark.fullsize
def test_full_size_open_clip_vs_diffusers(tmp_path, caplog, style="kohya"):
    """The full-size OpenCLIP ViT-H/14 tower (24 layers x q, k, v, out_proj, fc1, fc2 = 144 modules): a random
    kohya file through diffusers' LoRA loading (its kohya converter, PEFT layers, fused) on the CLIPTextModel
    its single-file converter makes of our weights, against our in_proj row blocks (read back through the same
    converter, and directly). About 45 s on 2 loaded cores; PEFT and LyCORIS files run on the tiny model."""
    from _lora_util import OPEN_PREFIX, _text_model, diffusers_merged, kohya_file, kohya_targets
    from _parity_util import fullsize_lock, hf_open_clip, hf_open_clip_config_for, max_rel_err

    from glass_diffusion.sd_core.open_clip import OpenCLIPTextModel
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    try:
        with fullsize_lock(), torch.no_grad():
            cfg = SDConfig.sd2().clip
            torch.manual_seed(0)
            clip = OpenCLIPTextModel(cfg).eval()  # its initialisation is random enough
            ref = hf_open_clip({OPEN_PREFIX + k: v for k, v in clip.state_dict().items()},
                               hf_open_clip_config_for(cfg), prefix=OPEN_PREFIX)
            targets = [(_text_model(name, True), shape) for name, shape in kohya_targets(ref, False)]
            assert len(targets) == 144
            path = tmp_path / f"sd2_{style}.safetensors"
            kohya_file(path, {"clip": targets}, seed=2, rank=4, alpha=2.0, style=style)
            strength = 0.8 if style == "kohya" else -0.6
            _, want = diffusers_merged(path, None, ref, strength_clip=strength)
            del ref
            assert len(want) == 144
            with caplog.at_level(logging.WARNING, logger=lora.log.name):
                _, patch = lora.load_lora(path, None, clip, 1.0, strength)
            assert not [r for r in caplog.records if r.name == lora.log.name], caplog.text
            view = lora.patched_module(clip, [patch])
            ours = clip_to_hf(view.state_dict(), SDConfig.sd2())
            errs = {k: max_rel_err(ours[k], v) for k, v in want.items()}
            W = cfg.width
            for i in (0, 23):  # directly: the rows of the packed in_proj
                packed = view.transformer.resblocks[i].attn.in_proj_weight
                for j, proj in enumerate("qkv"):
                    k = HF.format(i=i, m=f"self_attn.{proj}_proj") + ".weight"
                    errs[f"{k} (rows)"] = max_rel_err(packed[j * W:(j + 1) * W], want[k])
            worst = max(errs, key=errs.get)
            print(f"\nsd2 full-size text encoder LoRA ({style}) vs diffusers: worst {worst} {errs[worst]:.2e}")
            assert errs[worst] <= 1e-6, (worst, errs[worst])
            base = clip.transformer.resblocks[0].attn.in_proj_weight
            assert max_rel_err(view.transformer.resblocks[0].attn.in_proj_weight, base) > 1e-4
    finally:
        torch.set_num_threads(n)
