"""The model-family seam: family rows, the model handle (no family, no handle), parameter errors that name the
parameter, and their translation into node input errors that keep the error's class."""
import pytest
import torch

from glass_diffusion.nodes.types import GlassUNet, NodeInputError, as_input_error, node_inputs
from glass_diffusion.sd_core.checkpoint import CheckpointError
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.errors import ParamError
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT, detect, family_of_config
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.sampling import SampleRequest, check_request, sample
from glass_diffusion.sd_core.unet import UNetConfig, UNetModel


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNetModel(UNetConfig.tiny()).eval()


def test_a_handle_without_a_family_cannot_be_built(unet):
    with pytest.raises(TypeError, match="ModelFamily"):
        DiffusionModel.build(unet, None)
    with pytest.raises(TypeError, match="needs a ModelFamily as family"):
        DiffusionModel(unet, None, SD1.model_sampling(), SD1.latent)
    with pytest.raises(TypeError, match="ModelSampling as sampling"):
        DiffusionModel(unet, SD1, None, SD1.latent)
    with pytest.raises(TypeError, match="LatentFormat as latent_format"):
        DiffusionModel(unet, SD1, SD1.model_sampling(), None)
    with pytest.raises(TypeError, match="ModelFamily"):
        StableDiffusion(SDConfig.tiny(), None)


def test_handle_copies_share_the_weights(unet):
    h = GlassUNet(DiffusionModel.build(unet, SD1, scale_factor=0.5, source="x"))
    assert h.scaling_factor == 0.5 and SD1.latent.scale_factor == 0.18215  # the row is untouched
    v = h.with_sampling(SD1.model_sampling().__class__(SD1.schedule, "v"))
    p = h.with_patches([("lora", 1.0)])
    for copy in (v, p):
        assert isinstance(copy, GlassUNet) and copy.model.unet is h.model.unet and copy.family is SD1
    assert v.model.sampling.prediction == "v" and h.model.sampling.prediction == "eps"
    assert p.model.patches == (("lora", 1.0),) and h.model.patches == ()


def test_sd1_rows_hold_the_sd1_facts():
    for row in (SD1, SD1_INPAINT):
        ms = row.model_sampling()
        assert ms.prediction == "eps" and len(ms.sigmas) == 1000
        assert float(ms.sigmas[0]) == pytest.approx(0.0292, abs=1e-4)
        assert float(ms.sigmas[-1]) == pytest.approx(14.6146, abs=1e-4)
        assert row.latent.channels == 4 and row.latent.scale_factor == 0.18215
        assert row.text[0].pad_id is None and row.text[0].default_layer == -1  # pads with the end token
    assert not SD1.is_inpaint and SD1_INPAINT.is_inpaint and SD1_INPAINT.unet_in_channels == 9
    blank = SD1.latent.blank_inpaint_like(torch.zeros(2, 4, 3, 3))
    assert blank.shape == (2, 4, 3, 3) and torch.allclose(blank[1, :, 2, 2], torch.tensor([0.8223, -0.6876, 0.6364,
                                                                                          0.1380]))
    assert family_of_config(SDConfig.tiny()) is SD1 and family_of_config(SDConfig.tiny(inpainting=True)) is SD1_INPAINT


@pytest.mark.parametrize("keys, name, evidence", [
    ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (1,)}, "sd3", "joint_blocks"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (1,)}, "flux", "double_blocks"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (1,)}, "flux", "double_blocks"),
    ({"conditioner.embedders.0.transformer.text_model.x": (1,)}, "sdxl", "conditioner.embedders"),
])
def test_other_families_are_recognised_with_evidence(keys, name, evidence):
    row, found = detect(keys)
    assert row.name == name and evidence in found


def test_request_errors_name_the_parameter():
    ok = dict(seed=0, steps=2, cfg=3.0, sampler_name="euler")
    for bad, param in [(dict(steps=0), "steps"), (dict(cfg=float("inf")), "cfg"), (dict(denoise=2.0), "denoise"),
                       (dict(sampler_name="nope"), "sampler_name"), (dict(scheduler="nope"), "scheduler"),
                       (dict(seed=-1), "seed"), (dict(noise_kind="gpu"), "noise_kind"),
                       (dict(last_step=-2), "last_step"), (dict(sigmas=torch.tensor([1.0, 2.0])), "sigmas")]:
        with pytest.raises(ParamError) as info:
            check_request(SampleRequest(**{**ok, **bad}))
        assert info.value.param == param


def test_latent_of_the_wrong_format_names_the_latent(unet):
    h = DiffusionModel.build(unet, SD1)
    cond = [[torch.zeros(1, 77, 32), {}]]
    with pytest.raises(ParamError, match="expected a 4-channel SD 1.x latent, got 16 channels") as info:
        sample(h, cond, cond, {"samples": torch.zeros(1, 16, 8, 8)}, SampleRequest(seed=0, steps=1, cfg=1.0,
                                                                                   sampler_name="euler"))
    assert info.value.param == "latent"


def test_node_errors_keep_the_class_and_name_the_input():
    e = as_input_error("GlassX", "ckpt_name", CheckpointError("/m/a.safetensors", "looks like SDXL", ["k"]))
    assert isinstance(e, NodeInputError) and isinstance(e, CheckpointError) and e.keys == ["k"]
    assert str(e) == "GlassX: input 'ckpt_name': /m/a.safetensors: looks like SDXL" and e.input_name == "ckpt_name"
    with pytest.raises(NodeInputError, match="GlassY: input 'noise_seed': bad seed") as info:
        with node_inputs("GlassY", seed="noise_seed"):
            raise ParamError("seed", "bad seed")
    assert isinstance(info.value, ParamError) and info.value.param == "seed"
    assert isinstance(info.value.__cause__, ParamError)
    with pytest.raises(RuntimeError):  # anything else passes through untouched
        with node_inputs("GlassY"):
            raise RuntimeError("disk on fire")


def test_node_choice_lists_are_sd_cores():
    from glass_diffusion.nodes import sampling as sampling_nodes, text as text_nodes
    from glass_diffusion.sd_core.conditioning import WEIGHTINGS
    from glass_diffusion.sd_core.noise import NOISE_KINDS
    assert tuple(text_nodes.WEIGHTINGS) == WEIGHTINGS and tuple(sampling_nodes.NOISE_KINDS) == NOISE_KINDS
