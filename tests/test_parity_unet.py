"""Our UNet against diffusers' UNet2DConditionModel holding the same single-file weights, converted by
diffusers' own LDM converters. fp32; tolerance max|ours - theirs| <= 1e-4 * max|theirs|."""
from dataclasses import replace

import pytest
import torch
from _parity_util import diffusers_unet, ldm_config_for, max_rel_err, read_tensors, v1_inference_config

from glass_diffusion.sd_core.unet import UNetModel

PREFIX = "model.diffusion_model."
TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny", pytest.param("full", marks=pytest.mark.fullsize)])
def case(request):
    sd = request.getfixturevalue("tiny_sd" if request.param == "tiny" else "sd15_full")
    original = v1_inference_config if request.param == "full" else (lambda c: ldm_config_for(replace(
        sd.config, unet=replace(sd.config.unet, in_channels=c))))
    yield sd, read_tensors(sd.path, PREFIX), original


@torch.no_grad()
@pytest.mark.parametrize("in_channels", [4, 9])
def test_unet_noise_prediction_matches_diffusers(case, in_channels):
    sd, checkpoint, original_config = case
    cfg = sd.config.unet
    if in_channels == cfg.in_channels:
        ours = sd.model.unet
    else:  # an inpainting UNet: same weights but a 9-channel first conv
        g = torch.Generator().manual_seed(9)
        conv = checkpoint[PREFIX + "input_blocks.0.0.weight"]
        checkpoint = {**checkpoint, PREFIX + "input_blocks.0.0.weight":
                      torch.randn(conv.shape[0], in_channels, *conv.shape[2:], generator=g) * conv.std()}
        with torch.device("meta"):
            ours = UNetModel(replace(cfg, in_channels=in_channels))
        ours.load_state_dict({k[len(PREFIX):]: v for k, v in checkpoint.items()}, strict=True, assign=True)
        ours.eval()
    theirs = diffusers_unet(checkpoint, original_config(in_channels), norm_groups=cfg.norm_groups)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, in_channels, 8, 8, generator=g)
    context = torch.randn(3, 77, cfg.context_dim, generator=g)
    t = torch.tensor([1.0, 500.5, 999.0])  # fractional timesteps are part of the contract; diffusers takes them too
    eps = ours(x, t, context)
    ref = theirs(x, t, encoder_hidden_states=context).sample
    err = max_rel_err(eps, ref)
    print(f"\nunet parity in_channels={in_channels} size={'full' if cfg.model_channels == 320 else 'tiny'}: "
          f"max rel err {err:.2e} (max |eps| {ref.abs().max():.3g})")
    assert err <= TOL
    # each sample's timestep matters (a wrong embedding would not be caught by a single t)
    assert max_rel_err(eps[0], eps[2]) > 1e-2
