"""LoRA / LyCORIS parity: our patched UNet and CLIP weights equal those two independent implementations
compute from the same random file, within 1e-6 relative in fp32.

- kohya LoRA (diffusers spelling), kohya LoCon (LDM spelling, 3x3 convs, alpha absent on some modules) and
  PEFT (`unet.*.lora_A/B`, `text_encoder.*`) files against diffusers' LoRA loading (its kohya converter,
  PEFT layers, fused);
- LoHa, LoHa Tucker, LoKr (full and factorised), LoKr Tucker, LoCon Tucker (`lora_mid`) with DoRA, and full
  `diff` patches against the `lycoris-lora` package's own modules (files written by the package itself).

Each format runs on the tiny model in the fast suite and on the full-size SD 1.5 shapes (`fullsize`).
Our UNet is compared after diffusers' own LDM -> diffusers conversion, so no name mapping of ours is used
on the reference side.
"""
import gc
import logging
from types import SimpleNamespace

import pytest
import torch

from _lora_util import (DIFFUSERS_LDM_BLIND, _text_model, clip_to_hf, diffusers_merged, kohya_file, kohya_targets,
                        lycoris_file, lycoris_merged, reference_models, to_diffusers)
from _parity_util import max_rel_err

from glass_diffusion.sd_core import lora
from glass_diffusion.sd_core.family import SD2
from glass_diffusion.sd_core.model import SDConfig
from glass_diffusion.sd_core.random_weights import build_random

TOL = 1e-6

# name -> (source, options, strengths (unet, clip)); LyCORIS files target `targets` on the tiny model and
# `full_targets` on the full-size one (model-sized 3x3 conv patches of every res block would need ~13 GB there)
FORMATS = {
    "kohya_lora_diffusers_names": ("kohya", dict(ldm=False, conv3x3=False, alpha=2.0), (0.7, 1.3)),
    # no alpha key at all (diffusers gives modules without alpha the first module's alpha, so a file mixing
    # both is tested against the formula in test_lora_files). On the full-size model without the modules
    # diffusers cannot place in LDM spelling (_lora_util.DIFFUSERS_LDM_BLIND, the upsamplers): those are
    # covered in diffusers spelling by the LyCORIS formats, and LDM names are our own module names.
    "kohya_locon_ldm_names": ("kohya", dict(ldm=True, conv3x3=True, alpha=None), (1.0, 1.0)),
    "peft": ("peft", dict(ldm=False, conv3x3=False), (-0.8, 0.5)),
    "loha": ("lycoris", dict(algo="loha", full_targets="attention"), (1.0, 1.0)),
    "loha_tucker": ("lycoris", dict(algo="loha", use_tucker=True, full_targets="convs"), (1.0, 1.0)),
    "lokr": ("lycoris", dict(algo="lokr", full_targets="attention"), (1.0, 1.0)),
    "lokr_factorised": ("lycoris", dict(algo="lokr", dim=2, decompose_both=True, factor=16,
                                        full_targets="attention"), (1.0, 1.0)),
    # (not conv_in / conv_out: lycoris-lora cannot read back its factorised LoKr of a 4-channel side)
    "lokr_tucker": ("lycoris", dict(algo="lokr", dim=2, use_tucker=True, factor=8, full_targets="resamplers"),
                    (1.0, 1.0)),
    "locon_tucker_dora": ("lycoris", dict(algo="locon", use_tucker=True, dora_wd=True, full_targets="convs"),
                          (1.0, 1.0)),
    "locon_dora": ("lycoris", dict(algo="locon", dora_wd=True, full_targets="attention"), (1.0, 1.0)),
    "full_diff": ("lycoris", dict(algo="full", targets="convs", full_targets="convs"), (1.0, 1.0)),
}


def _file(kind, opts, tmp_path, ours, ref_unet, ref_clip, seed, full):
    path = tmp_path / "lora.safetensors"
    if kind == "lycoris":
        opts = dict(opts)
        full_targets = opts.pop("full_targets")
        if full:
            opts["targets"] = full_targets
        return path, lycoris_file(path, ref_unet, ref_clip, seed, **opts)
    blind = DIFFUSERS_LDM_BLIND if full and opts["ldm"] else ()
    unet_names = kohya_targets(ours.unet if opts["ldm"] else ref_unet, opts["conv3x3"], upsamplers=not full,
                               skip=blind)
    # file CLIP names: Hugging Face's, read off the reference CLIPTextModel (for SD 1.x also ours)
    targets = {"unet": unet_names, "clip": [(_text_model(n, True), s) for n, s in kohya_targets(ref_clip, False)]}
    style = "kohya" if kind == "kohya" else "peft"
    return path, kohya_file(path, targets, seed, alpha=opts.get("alpha", 2.0), style=style)


# lycoris-lora 4.1.3 cannot read back its own Tucker LoKr files (its reader takes lokr_w2_a's second dimension
# for the rank); for those the modules that wrote the file are the reference
NO_READBACK = {"lokr_tucker"}


def _reference(name, kind, opts, path, state, ref_unet, ref_clip, strengths):
    if kind == "lycoris":
        assert strengths == (1.0, 1.0)  # LyCORIS' multiplier has another meaning for DoRA (see README)
        state, net = state
        return lycoris_merged(state, ref_unet, ref_clip, net=net if name in NO_READBACK else None)
    return diffusers_merged(path, ref_unet, ref_clip, *strengths, ldm_names=opts["ldm"])


def check_parity(name, model, config, tmp_path, caplog, seed=1, full=False):
    kind, opts, strengths = FORMATS[name]
    ref_unet, ref_clip = reference_models(model, config)
    path, state = _file(kind, opts, tmp_path, model, ref_unet, ref_clip, seed, full)
    keys = state[0] if kind == "lycoris" else state
    for suffix in MUST_HAVE.get(name, ()):
        assert any(k.endswith(suffix) for k in keys), f"{name}: the file has no {suffix} key"
    want_unet, want_clip = _reference(name, kind, opts, path, state, ref_unet, ref_clip, strengths)
    assert want_unet and want_clip, "the reference applied nothing"

    with caplog.at_level(logging.WARNING, logger="glass_diffusion.sd_core.lora"):
        unet_patch, clip_patch = lora.load_lora(path, model.unet, model.clip, *strengths)
    assert not [r for r in caplog.records if r.name == lora.log.name], caplog.text  # every key was placed
    ours_unet = to_diffusers(lora.patched_module(model.unet, [unet_patch]).state_dict(), config)
    ours_clip = clip_to_hf(lora.patched_module(model.clip, [clip_patch]).state_dict(), config)
    base_unet, base_clip = to_diffusers(model.unet.state_dict(), config), clip_to_hf(model.clip.state_dict(), config)

    figures = []
    for want, ours, base in ((want_unet, ours_unet, base_unet), (want_clip, ours_clip, base_clip)):
        assert set(want) <= set(ours)
        errs = {k: max_rel_err(ours[k], v) for k, v in want.items()}
        worst = max(errs, key=errs.get)
        assert errs[worst] <= TOL, f"{name}: {worst} differs by {errs[worst]:.2e} relative"
        assert all(max_rel_err(want[k], base[k]) > 1e-4 for k in want), "a reference patch changed nothing"
        # every other weight is the loaded one, bitwise
        assert all(torch.equal(ours[k], base[k]) for k in ours if k not in want)
        figures.append(f"{len(want)} weights, worst {errs[worst]:.1e}")
    print(f"\nlora parity {name}: unet {figures[0]}; clip {figures[1]}")
    return set(want_unet), set(want_clip)


# lycoris-lora 4.1.3 cannot read back its own factorised LoKr files on the tiny model's 32/64 channels
# (its reader guesses the factorisation); they run on the full-size shapes
TINY_SKIP = {"lokr_factorised"}
# what each format must contain (so a generator change cannot quietly drop the variant under test)
MUST_HAVE = {"lokr_factorised": (".lokr_w2_a",), "lokr_tucker": (".lokr_t2",),
             "loha_tucker": (".hada_t1",), "locon_tucker_dora": (".lora_mid.weight", ".dora_scale"),
             "full_diff": (".diff", ".diff_b"), "kohya_locon_ldm_names": ("in_layers_2.lora_up.weight",),
             "peft": (".lora_A.weight",)}


@pytest.mark.parametrize("name", sorted(set(FORMATS) - TINY_SKIP))
def test_lora_parity_tiny(name, tiny_sd, tmp_path, caplog):
    unet, clip = check_parity(name, tiny_sd.model, tiny_sd.config, tmp_path, caplog)
    assert len(unet) >= 10 and len(clip) >= 6


@pytest.fixture(scope="module")
def tiny_sd2():
    """A tiny SD 2.x model: OpenCLIP text tower (packed in_proj), linear proj_in / proj_out."""
    config = SDConfig.tiny_sd2()
    return SimpleNamespace(model=build_random(config, seed=0, family=SD2), config=config)


@pytest.mark.parametrize("name", sorted(set(FORMATS) - TINY_SKIP))
def test_lora_parity_tiny_sd2(name, tiny_sd2, tmp_path, caplog):
    """SD 2.x files: the text-encoder part lands on OpenCLIP's packed in_proj row blocks (compared after
    diffusers' own OpenCLIP -> CLIPTextModel conversion, which splits them into q, k, v), the UNet part on
    linear proj_in / proj_out."""
    unet, clip = check_parity(name, tiny_sd2.model, tiny_sd2.config, tmp_path, caplog)
    assert len(unet) >= 10 and len(clip) >= 6
    if FORMATS[name][0] != "lycoris" or "attention" in name or FORMATS[name][1].get("full_targets") == "attention":
        assert any(k.endswith("proj_in.weight") for k in unet)  # linear in SD 2.x
    assert any(k.endswith("q_proj.weight") for k in clip)  # a row block of the packed in_proj


# On the full-size shapes every key layout and tensor kind is covered once (each full-size case costs about a
# minute of CI on 2 cores): kohya in both spellings with 1x1 / 3x3 convs, PEFT, LoHa Tucker, factorised LoKr,
# LoCon Tucker + DoRA. The other formats' arithmetic is size-independent and runs on the tiny model (set
# FULLSIZE = tuple(FORMATS) to run every format on the full-size shapes).
FULLSIZE = ("kohya_lora_diffusers_names", "kohya_locon_ldm_names", "peft", "loha_tucker", "lokr_factorised",
            "locon_tucker_dora")


@pytest.mark.fullsize
@pytest.mark.parametrize("name", FULLSIZE)
def test_lora_parity_fullsize(name, sd15_full, tmp_path, caplog):
    n_unet, n_clip = map(len, check_parity(name, sd15_full.model, sd15_full.config, tmp_path, caplog, full=True))
    gc.collect()
    targets = FORMATS[name][1].get("full_targets")
    twice = 2 if name == "full_diff" else 1  # diff patches weight and bias
    if targets == "convs":  # 3 down- + 3 upsamplers, conv_in, conv_out, a linear; CLIP: 12 layers x 4 projections
        assert n_unet == 9 * twice and n_clip == 48 * twice
    elif targets == "resamplers":
        assert n_unet == 6 and n_clip == 48
    else:  # SD 1.5: 16 transformers x 12 layers = 192 UNet modules (more with LoCon), 12 CLIP layers x 6 = 72
        assert n_unet >= 192 and n_clip == 72
