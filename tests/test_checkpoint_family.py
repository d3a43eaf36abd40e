"""detect_family on real layouts, and load_checkpoint's refusal of anything but SD 1.x / SD 2.x naming the family
found (SD 2.x itself: tests/test_sd2_family.py)."""
import pytest
import torch

from glass_diffusion.sd_core.checkpoint import CheckpointError, detect_family, load_checkpoint

from _ckpt_util import read_tsv, tiny_state, write

SD15 = {k: shape for k, (shape, _) in read_tsv().items()}
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def sd2_layout() -> dict:
    """SD 2.x: OpenCLIP text encoder under cond_stage_model.model.*, linear proj_in / proj_out."""
    keys = {k: s for k, s in SD15.items() if not k.startswith("cond_stage_model.")}
    keys.update({"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                 "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)})
    return keys


def sdxl_layout() -> dict:
    keys = {k: s for k, s in SD15.items() if k.startswith("model.diffusion_model.") or k.startswith("first_stage")}
    keys.update({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                 "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)})
    return keys


def test_detect_family_on_layouts():
    assert detect_family(SD15) == "sd1"
    assert detect_family(list(SD15)) == "sd1"  # names only
    assert detect_family({**SD15, CONV_IN: (320, 9, 3, 3)}) == "sd1-inpaint"
    assert detect_family(sd2_layout()) == "sd2"
    assert detect_family(list(sd2_layout())) == "sd2"
    assert detect_family(sdxl_layout()) == "sdxl"
    assert detect_family(list(sdxl_layout())) == "sdxl"
    assert detect_family({"lora_unet_down_blocks_0.alpha": ()}) == "unknown"
    assert detect_family([k for k in SD15 if k.startswith("first_stage_model.")]) == "unknown"


def test_detect_family_sees_linear_proj_in_and_accepts_tensors():
    linear = {k: (s[:2] if k.endswith(("proj_in.weight", "proj_out.weight")) and len(s) == 4 else s)
              for k, s in SD15.items()}
    assert detect_family(linear) == "sd2"  # SD 2.x UNet with an SD 1.x-looking text encoder name
    tensors = {CONV_IN: torch.zeros(8, 9, 3, 3), "cond_stage_model.transformer.x": torch.zeros(1)}
    assert detect_family(tensors) == "sd1-inpaint"


def refusal(tmp_path, keys: dict) -> str:
    state = {k: torch.zeros(1) for k in keys}
    path = write(tmp_path / "other.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


def test_refuses_sdxl(tmp_path):
    msg = refusal(tmp_path, sdxl_layout())
    assert msg.endswith("looks like an SDXL checkpoint (found conditioner.embedders.*); "
                        "Glass Diffusion loads SD 1.x and SD 2.x only") and str(tmp_path) in msg


def test_refuses_an_sd2_unet_with_an_sd1_text_encoder(tmp_path):
    """Linear proj_in makes it SD 2.x; without the OpenCLIP text tower it cannot be loaded."""
    state = tiny_state()
    for k in [k for k in state if k.endswith("proj_in.weight")]:
        state[k] = state[k].flatten(1)
    assert detect_family(state) == "sd2"
    path = write(tmp_path / "v2ish.safetensors", state)
    with pytest.raises(CheckpointError, match=r"has an SD 2\.x UNet but no cond_stage_model\.model\.\* \(OpenCLIP\) "
                                              r"text encoder; first keys: cond_stage_model\.transformer\."):
        load_checkpoint(path)


@pytest.mark.parametrize("keys, hint", [
    ({"lora_unet_down_blocks_0_attentions_0.alpha": ()}, "first keys: lora_unet_down_blocks_0_attentions_0.alpha"),
    ({"encoder.conv_in.weight": (), "decoder.conv_in.weight": ()}, "a standalone VAE, load it with load_vae"),
    ({"down_blocks.0.resnets.0.conv1.weight": ()}, "diffusers-style names"),
    ({"model.diffusion_model.out.2.weight": ()}, "a UNet but no cond_stage_model.transformer.* text encoder"),
])
def test_refuses_unknown_with_a_hint(tmp_path, keys, hint):
    msg = refusal(tmp_path, keys)
    assert "looks like an unknown kind of checkpoint" in msg and hint in msg


def test_inpainting_is_loaded_not_refused(tmp_path):
    model = load_checkpoint(write(tmp_path / "inpaint.safetensors", tiny_state(inpainting=True)))
    assert model.unet.input_blocks[0][0].weight.shape[1] == 9
