"""LoRA files on the tiny model: ComfyUI's alpha rules, spellings, the copy-on-write patch layer (the loaded
model is never changed, strength 0 is the model itself, only patched tensors are new), stacking order,
dtypes, DoRA's normalisation axis, and bad files (clear error naming the file, nothing applied)."""
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from _lora_util import kohya_targets, random_lowrank

from glass_diffusion.sd_core import lora
from glass_diffusion.sd_core.lora import LoraError

Q = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"  # a tiny-UNet attention projection [64, 64]
CONV = "input_blocks.3.0.in_layers.2"                  # a 3x3 conv [64, 32, 3, 3]
TE = "text_model.encoder.layers.0.self_attn.q_proj"


def _k(name, net="unet"):
    return ("lora_unet_" if net == "unet" else "lora_te_") + name.replace(".", "_")


def _save(tmp_path, tensors, name="l.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lowrank(model, name, seed=0, rank=4, alpha=None):
    w = model.get_submodule(name).weight
    up, down = random_lowrank(torch.Generator().manual_seed(seed), tuple(w.shape), rank)
    t = {f"{_k(name)}.lora_up.weight": up, f"{_k(name)}.lora_down.weight": down}
    if alpha is not None:
        t[f"{_k(name)}.alpha"] = torch.tensor(float(alpha))
    return t, up, down


def _patched(model, path, strength=1.0):
    patch, _ = lora.load_lora(path, model, None, strength)
    return lora.patched_module(model, [patch]) if patch else model


@pytest.mark.parametrize("alpha,scale", [(None, 1.0), (2.0, 0.5), (0.0, 0.0)])
def test_alpha_rules_follow_comfyui(tiny_sd, tmp_path, alpha, scale):
    """No alpha: scale 1; alpha a: a / rank; alpha 0: scale 0 (ComfyUI; kohya would read it as rank)."""
    unet = tiny_sd.model.unet
    t, up, down = _lowrank(unet, Q, alpha=alpha)
    out = _patched(unet, _save(tmp_path, t), strength=0.6)
    w = unet.get_submodule(Q).weight
    torch.testing.assert_close(out.get_submodule(Q).weight, w + 0.6 * scale * (up @ down), rtol=1e-6, atol=1e-7)


def test_conv_and_tucker_mid(tiny_sd, tmp_path):
    unet = tiny_sd.model.unet
    w = unet.get_submodule(CONV).weight  # [64, 32, 3, 3]
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(64, 4, 1, 1, generator=g), torch.randn(4, 32, 1, 1, generator=g)
    mid = torch.randn(4, 4, 3, 3, generator=g)
    t = {f"{_k(CONV)}.lora_up.weight": up, f"{_k(CONV)}.lora_down.weight": down, f"{_k(CONV)}.lora_mid.weight": mid}
    out = _patched(unet, _save(tmp_path, t))
    want = w + torch.einsum("o i, i j h k, j c -> o c h k", up.flatten(1), mid, down.flatten(1))
    torch.testing.assert_close(out.get_submodule(CONV).weight, want, rtol=1e-5, atol=1e-6)


def test_spellings_give_the_same_patch(tiny_sd, tmp_path):
    """kohya LDM / kohya diffusers / PEFT / old diffusers attention processors / generic: one module."""
    unet = tiny_sd.model.unet
    t, up, down = _lowrank(unet, Q)
    d = lora.diffusers_unet_names(unet)[Q]  # down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    assert d == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    spellings = {
        "ldm": {f"{_k(Q)}.lora_up.weight": up, f"{_k(Q)}.lora_down.weight": down},
        "diffusers": {f"lora_unet_{d.replace('.', '_')}.lora_up.weight": up,
                      f"lora_unet_{d.replace('.', '_')}.lora_down.weight": down},
        "peft": {f"unet.{d}.lora_B.weight": up, f"unet.{d}.lora_A.weight": down},
        "processor": {f"unet.{d.replace('.to_q', '.processor.to_q')}_lora.up.weight": up,
                      f"unet.{d.replace('.to_q', '.processor.to_q')}_lora.down.weight": down},
        "generic": {f"diffusion_model.{Q}.lora_up.weight": up, f"diffusion_model.{Q}.lora_down.weight": down},
    }
    results = [_patched(unet, _save(tmp_path, s, f"{n}.safetensors")).get_submodule(Q).weight
               for n, s in spellings.items()]
    assert not torch.equal(results[0], unet.get_submodule(Q).weight)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_unmatched_keys_one_warning(tiny_sd, tmp_path, caplog):
    unet, clip = tiny_sd.model.unet, tiny_sd.model.clip
    t, _, _ = _lowrank(unet, Q)
    t["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(2, 2)
    t["something_else"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING, logger=lora.log.name):
        patch, _ = lora.load_lora(_save(tmp_path, t), unet, clip)
    records = [r for r in caplog.records if r.name == lora.log.name]
    assert len(records) == 1
    assert "lora_unet_no_such_block.lora_up.weight" in records[0].message and "something_else" in records[0].message
    assert list(patch.adapters) == [Q + ".weight"]


def test_patch_layer_never_touches_the_loaded_model(tiny_sd, tmp_path):
    unet = tiny_sd.model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ids = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    targets = {"unet": kohya_targets(unet, conv3x3=True)}
    from _lora_util import kohya_file
    path = tmp_path / "many.safetensors"
    kohya_file(path, targets, seed=5)
    patch, _ = lora.load_lora(path, unet, None)
    view = lora.patched_module(unet, [patch])
    assert view is not unet and type(view) is type(unet)
    # the loaded model: same tensors, same values
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == ids
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    # the view: new tensors exactly for the patched weights, every other tensor shared (no second model)
    patched = set(patch.adapters)
    view_sd = view.state_dict()
    assert {k for k, v in view_sd.items() if v.data_ptr() != ids[k]} == patched
    # and it runs: its output differs from the loaded model's
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    assert not torch.allclose(view(x, t, c), unet(x, t, c))
    # strength 0 (and no patch at all) is the loaded model itself
    assert lora.patched_module(unet, [patch.with_strength(0.0)]) is unet
    assert lora.patched_module(unet, []) is unet


def test_stacking_in_order_and_dtype(tiny_sd, tmp_path):
    """Two files add up in order, in fp32, cast once to the weight's dtype (fp16 here)."""
    unet = tiny_sd.model.unet
    t1, up1, down1 = _lowrank(unet, Q, seed=1, alpha=2.0)
    t2, up2, down2 = _lowrank(unet, Q, seed=2)
    p1, _ = lora.load_lora(_save(tmp_path, t1, "a.safetensors"), unet, None, 0.5)
    p2, _ = lora.load_lora(_save(tmp_path, t2, "b.safetensors"), unet, None, -1.5)
    w = unet.get_submodule(Q).weight
    want = w + 0.5 * 0.5 * (up1 @ down1) - 1.5 * (up2 @ down2)
    torch.testing.assert_close(lora.patched_module(unet, [p1, p2]).get_submodule(Q).weight, want,
                               rtol=1e-6, atol=1e-7)
    import copy
    half = copy.deepcopy(unet.get_submodule("input_blocks.3.1")).half()
    name = "transformer_blocks.0.attn1.to_q"
    pa = lora.LoraPatch("a", {name + ".weight": p1.adapters[Q + ".weight"]}, 0.5)
    out = lora.patched_module(half, [pa]).get_submodule(name).weight
    assert out.dtype == torch.float16
    assert torch.equal(out, (half.get_submodule(name).weight.float() + 0.5 * 0.5 * (up1 @ down1)).half())


def test_dora_follows_the_method(tiny_sd, tmp_path):
    """Output-axis DoRA: dora_scale * (W + dW) / ||W + dW|| per output row (the method, LyCORIS); ComfyUI
    divides by ||W||. Strength s blends W + s (W' - W), so 0 is W."""
    unet = tiny_sd.model.unet
    t, up, down = _lowrank(unet, Q, alpha=4.0)
    w = unet.get_submodule(Q).weight
    m = w.norm(dim=1, keepdim=True) * 1.3
    t[f"{_k(Q)}.dora_scale"] = m
    path = _save(tmp_path, t)
    merged = w + up @ down
    want = merged * (m / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
    comfy = merged * (m / (w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
    got = _patched(unet, path).get_submodule(Q).weight
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, comfy, rtol=1e-4)
    torch.testing.assert_close(_patched(unet, path, 0.25).get_submodule(Q).weight, w + 0.25 * (want - w),
                               rtol=1e-6, atol=1e-7)


def test_clip_keys(tiny_sd, tmp_path):
    clip = tiny_sd.model.clip
    w = clip.get_submodule(TE).weight
    up, down = random_lowrank(torch.Generator().manual_seed(0), tuple(w.shape), 2)
    for key in (_k(TE, "clip"), f"text_encoder.{TE}"):
        t = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
        _, patch = lora.load_lora(_save(tmp_path, t), tiny_sd.model.unet, clip, 1.0, 0.5)
        out = lora.patched_module(clip, [patch]).get_submodule(TE).weight
        torch.testing.assert_close(out, w + 0.5 * up @ down, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ bad files
class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad(tmp_path, tiny_sd, what):
    unet = tiny_sd.model.unet
    t, up, down = _lowrank(unet, Q)
    if what == "wrong shape":
        t[f"{_k(Q)}.lora_up.weight"] = torch.randn(65, 4)
    elif what == "nan":
        t[f"{_k(Q)}.lora_down.weight"][0, 0] = float("nan")
    elif what == "another family":  # an SDXL LoRA: two text encoders, SDXL block names and widths
        t = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4),
             "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight": torch.randn(640, 4)}
    elif what == "missing pair":
        del t[f"{_k(Q)}.lora_down.weight"]
    elif what == "truncated":
        path = _save(tmp_path, t)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        return path
    elif what == "pickle":
        path = tmp_path / "evil.ckpt"
        with open(path, "wb") as f:
            pickle.dump({"x": _Boom()}, f)
        return path
    elif what == "not a tensor file":
        path = tmp_path / "notes.safetensors"
        path.write_text("hello")
        return path
    return _save(tmp_path, t, "bad.safetensors")


@pytest.mark.parametrize("what", ["wrong shape", "nan", "another family", "missing pair", "truncated",
                                  "pickle", "not a tensor file"])
def test_bad_files_clear_error_nothing_applied(tiny_sd, tmp_path, what, capsys):
    unet, clip = tiny_sd.model.unet, tiny_sd.model.clip
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    path = _bad(tmp_path, tiny_sd, what)
    with pytest.raises(LoraError) as e:
        lora.load_lora(path, unet, clip)
    assert path.name in str(e.value)
    assert "this must never run" not in capsys.readouterr().out
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
