"""Our ControlNet against diffusers' ControlNetModel holding the same LDM-layout weights (converted by diffusers'
own `convert_controlnet_checkpoint`), and our UNet with the residuals added against diffusers' UNet with
`down_block_additional_residuals`. fp32; tolerance max|ours - theirs| <= 1e-4 * max|theirs|.

The full-size case (random SD 1.5 ControlNet, 361 M parameters, ~1.45 GB fp32 held twice) runs under the
machine-wide full-size lock; its inputs are 8x8 latents (64x64 control images), so it costs seconds of
compute (about 30 s in all, most of it building and converting the weights)."""
import pytest
import torch
from _parity_util import (diffusers_unet, fullsize_lock, ldm_config_for, max_rel_err, random_init_, read_tensors,
                          v1_inference_config)
from safetensors.torch import save_file

from glass_diffusion.sd_core.controlnet import ControlNet, ControlNetConfig, load_controlnet, save_controlnet
from glass_diffusion.sd_core.unet import UNetConfig

TOL = 1e-4


def diffusers_controlnet(checkpoint: dict, original_config: dict, cfg: ControlNetConfig):
    """diffusers ControlNetModel from `control_model.*` tensors through diffusers' own LDM converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm

    # diffusers 0.42's create_controlnet_diffusers_config_from_ldm calls the UNet config helper without its
    # `checkpoint` argument (TypeError), so take the same fields from that helper here
    unet = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=512)
    config = {k: unet[k] for k in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
        "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
        "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")}
    config["conditioning_channels"] = original_config["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    config["norm_num_groups"] = cfg.unet.norm_groups  # not part of LDM configs (always 32 in real models)
    config["conditioning_embedding_out_channels"] = tuple(cfg.hint_widths)  # fixed (16, 32, 96, 256) in real ones
    state = convert_controlnet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        model = ControlNetModel(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval(), state


def _original_config(unet_params: dict) -> dict:
    d = unet_params
    d["model"]["params"]["control_stage_config"] = {"params": {"hint_channels": 3}}
    return d


def _build(cfg: ControlNetConfig, seed: int) -> ControlNet:
    with torch.device("meta"):
        net = ControlNet(cfg)
    return random_init_(net.to_empty(device="cpu"), seed).eval()


@pytest.fixture(scope="module", params=["tiny", pytest.param("full", marks=pytest.mark.fullsize)])
def case(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn")
    if request.param == "tiny":
        sd = request.getfixturevalue("tiny_sd")
        cfg = ControlNetConfig(sd.config.unet, hint_widths=(8, 16, 16, 32))
        original = _original_config(ldm_config_for(sd.config))
        yield sd, cfg, _build(cfg, 3), original, tmp
        return
    with fullsize_lock():
        sd = request.getfixturevalue("sd15_full")
        cfg = ControlNetConfig(UNetConfig())
        yield sd, cfg, _build(cfg, 3), _original_config(v1_inference_config()), tmp


def _inputs(cfg: ControlNetConfig, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    hint = torch.rand(3, 3, 8 * cfg.downscale, 8 * cfg.downscale, generator=g)
    context = torch.randn(3, 77, cfg.unet.context_dim, generator=g)
    return x, hint, context


@torch.no_grad()
def test_controlnet_residuals_match_diffusers(case):
    sd, cfg, ours, original, tmp = case
    path = save_controlnet(ours, tmp / "cn_ldm.safetensors", dtype=torch.float32, overwrite=True)
    checkpoint = read_tensors(path, "control_model.")
    assert len(checkpoint) == len(ours.state_dict())
    theirs, diffusers_state = diffusers_controlnet(checkpoint, original, cfg)
    loaded = load_controlnet(path)  # our loader, from the file (config from the metadata)

    x, hint, context = _inputs(cfg)
    for t, strength in ((torch.tensor([1.0, 500.5, 999.0]), 1.0), (torch.tensor([250.0] * 3), 0.35),
                        (torch.tensor([999.0, 20.0, 640.0]), 2.0)):
        res = loaded(x, hint, t, context).scaled(strength)
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=strength,
                           return_dict=False)
        assert len(res.skips) == len(down) == len(ours.input_blocks)
        errs = [max_rel_err(a, b) for a, b in zip(res.skips, down)] + [max_rel_err(res.middle, mid)]
        print(f"\ncontrolnet parity {cfg.unet.model_channels}ch t={t.tolist()} strength={strength}: "
              f"max rel err {max(errs):.2e} over {len(errs)} residuals")
        assert max(errs) <= TOL
    # every sample's timestep and control image matter
    assert max_rel_err(res.middle[0], res.middle[2]) > 1e-2

    # the diffusers-layout file (diffusers' own names, as ControlNetModel.save_pretrained writes them) loads
    # to the same numbers, config inferred from shapes
    dpath = tmp / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_state.items()}, str(dpath))
    full = cfg.unet.model_channels == 320  # the tiny model's head count is not SD's 8: pass its config
    from_diffusers = load_controlnet(dpath, config=None if full else cfg)
    assert from_diffusers.config == cfg
    a, b = from_diffusers(x, hint, t, context), loaded(x, hint, t, context)
    assert all(torch.equal(p, q) for p, q in zip(a.skips + (a.middle,), b.skips + (b.middle,)))


@torch.no_grad()
def test_unet_with_control_matches_diffusers(case):
    """The residuals go where diffusers (and ComfyUI) put them: added to the skip connections and the middle."""
    sd, cfg, ours, original, tmp = case
    unet_ckpt = read_tensors(sd.path, "model.diffusion_model.")
    theirs = diffusers_unet(unet_ckpt, original, norm_groups=cfg.unet.norm_groups)
    x, hint, context = _inputs(cfg)
    t = torch.tensor([3.0, 480.0, 900.0])
    res = ours(x, hint, t, context).scaled(0.8)
    eps = sd.model.unet(x, t, context, control=res)
    ref = theirs(x, t, encoder_hidden_states=context, down_block_additional_residuals=list(res.skips),
                 mid_block_additional_residual=res.middle).sample
    plain = sd.model.unet(x, t, context)
    err = max_rel_err(eps, ref)
    print(f"\nunet+control parity {cfg.unet.model_channels}ch: max rel err {err:.2e}; "
          f"control changed eps by {max_rel_err(plain, ref):.2e} relative")
    assert err <= TOL
    assert max_rel_err(plain, ref) > 1e-2  # the control really changed the output
