"""How a ControlNet is applied (sd_core.controlnet + guidance): the residuals are the ControlNet's outputs on the
UNet's own scaled input, times strength, only inside the step range, summed over a chain, in one batch with
CFG; bad control images are refused before any UNet call; files load or fail naming the file."""
import math

import pytest
import torch
from _parity_util import random_init_
from safetensors.torch import save_file

from glass_diffusion.sd_core.checkpoint import CheckpointError
from glass_diffusion.sd_core.controlnet import (CONTROL_KEY, ControlNet, ControlNetConfig, apply_control, check_image,
                                                load_controlnet, resize_hint, save_controlnet)
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import SD1
from glass_diffusion.sd_core.guidance import CFGDenoiser
from glass_diffusion.sd_core.unet import UNetConfig, UNetModel

CFG = UNetConfig.tiny()


def _net(seed: int) -> ControlNet:
    torch.manual_seed(seed)
    return random_init_(ControlNet(ControlNetConfig(CFG, hint_widths=(4, 8, 8, 16))), seed).eval()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = random_init_(UNetModel(CFG), 0).eval()
    g = torch.Generator().manual_seed(5)
    pos = [[torch.randn(1, 77, CFG.context_dim, generator=g), {}]]
    neg = [[torch.randn(1, 77, CFG.context_dim, generator=g), {}]]
    image = torch.rand(1, 64, 64, 3, generator=g)
    return unet, _net(1), _net(2), pos, neg, image


class Counting(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, x, t, context, control=None):
        self.calls.append(x.shape[0])
        return self.unet(x, t, context, control=control)


def _manual_x0(unet, nets, x, sigma, contexts, image, cfg):
    """x0 from first principles: scaled input, timestep, residuals = sum of strength * ControlNet(...)."""
    ms = SD1.model_sampling()
    s = torch.tensor([sigma])
    inp, t = ms.calculate_input(s, x), ms.timestep(s)
    outs = []
    for ctx in contexts:
        res = None
        for net, strength in nets:
            hint = resize_hint(image.movedim(-1, 1), x.shape[2] * 8, x.shape[3] * 8)
            r = net(inp, hint, t, ctx).scaled(strength)
            res = r if res is None else res + r
        outs.append(ms.calculate_denoised(s, unet(inp, t, ctx, control=res), x))
    cond, uncond = outs
    return uncond + (cond - uncond) * cfg


@torch.no_grad()
def test_residuals_strength_chain_and_cfg_batch(parts):
    unet, net_a, net_b, pos, neg, image = parts
    hint = check_image(image)
    shared = {}
    pos1, neg1 = apply_control(pos, net_a, hint, 0.7, 0.0, 1.0, shared), apply_control(neg, net_a, hint, 0.7, 0.0, 1.0, shared)
    assert pos1[0][1][CONTROL_KEY] is neg1[0][1][CONTROL_KEY]  # one application shared: one batch
    assert CONTROL_KEY not in pos[0][1]  # inputs untouched
    shared = {}
    pos2, neg2 = apply_control(pos1, net_b, hint, 1.3, 0, 1, shared), apply_control(neg1, net_b, hint, 1.3, 0, 1, shared)
    assert [a.net for a in pos2[0][1][CONTROL_KEY].chain()] == [net_a, net_b]

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = 3.0
    counting = Counting(unet)
    den = CFGDenoiser(DiffusionModel.build(counting, SD1), pos2, neg2, 5.0, x.shape)
    got = den(x, torch.tensor([sigma]))
    assert counting.calls == [2]  # cond and uncond in one UNet call, control included
    want = _manual_x0(unet, [(net_a, 0.7), (net_b, 1.3)], x, sigma, [pos[0][0], neg[0][0]], image, 5.0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    plain = CFGDenoiser(DiffusionModel.build(unet, SD1), pos, neg, 5.0, x.shape)(x, torch.tensor([sigma]))
    assert (got - plain).abs().max() > 1e-2  # the control really acts
    only_a = _manual_x0(unet, [(net_a, 0.7)], x, sigma, [pos[0][0], neg[0][0]], image, 5.0)
    assert (got - only_a).abs().max() > 1e-3  # and the second ControlNet adds to the first


@torch.no_grad()
def test_control_applies_only_inside_the_step_range(parts):
    unet, net_a, _, pos, neg, image = parts
    ms = SD1.model_sampling()
    start, end = 0.2, 0.8
    shared = {}
    p, n = (apply_control(c, net_a, check_image(image), 1.0, start, end, shared) for c in (pos, neg))
    h = DiffusionModel.build(unet, SD1)
    den, plain = CFGDenoiser(h, p, n, 4.0, (1, 4, 8, 8)), CFGDenoiser(h, pos, neg, 4.0, (1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    s_start, s_end = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    for sigma, inside in ((s_start * 1.05, False), (s_start * 0.99, True), (math.sqrt(s_start * s_end), True),
                          (s_end * 1.01, True), (s_end * 0.95, False)):
        s = torch.tensor([sigma])
        differs = (den(x, s) - plain(x, s)).abs().max().item() > 1e-4
        assert differs == inside, (sigma, inside)


@torch.no_grad()
def test_control_image_resized_as_comfyui_and_batches(parts):
    unet, net_a, _, pos, neg, _ = parts
    # centre crop to the target aspect, then nearest-exact: a 4x8 image -> 2x2 keeps columns 2..5, and
    # nearest-exact picks rows 1, 3 and (cropped) columns 1, 3
    img = torch.arange(32.0).reshape(1, 1, 4, 8)
    assert torch.equal(resize_hint(img, 2, 2), torch.tensor([[[[11.0, 13.0], [27.0, 29.0]]]]))
    assert torch.equal(resize_hint(img.transpose(2, 3), 2, 2), torch.tensor([[[[11.0, 27.0], [13.0, 29.0]]]]))
    # a control image of another size is resized to 8x the latent; one per latent is taken row by row
    g = torch.Generator().manual_seed(6)
    image = torch.rand(2, 50, 70, 3, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    shared = {}
    p, n = (apply_control(c, net_a, check_image(image), 1.0, 0, 1, shared) for c in (pos, neg))
    got = CFGDenoiser(DiffusionModel.build(unet, SD1), p, n, 3.0, x.shape)(x, torch.tensor([2.0, 2.0]))
    for i in range(2):
        one = [[[c[0][0], {}]] for c in (pos, neg)]
        shared = {}
        p1, n1 = (apply_control(c, net_a, check_image(image[i:i + 1]), 1.0, 0, 1, shared) for c in one)
        ref = CFGDenoiser(DiffusionModel.build(unet, SD1), p1, n1, 3.0, (1, 4, 8, 8))(x[i:i + 1], torch.tensor([2.0]))
        assert (got[i:i + 1] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bad_control_images_are_refused_before_any_step(parts):
    unet, net_a, _, pos, neg, image = parts
    with pytest.raises(ValueError, match="NaN"):
        check_image(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(ValueError, match=r"IMAGE \[B, H, W, 3\]"):
        check_image(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        check_image(torch.rand(0, 8, 8, 3))
    shared = {}
    three = check_image(torch.rand(3, 64, 64, 3))
    p, n = (apply_control(c, net_a, three, 1.0, 0, 1, shared) for c in (pos, neg))
    counting = Counting(unet)
    with pytest.raises(ValueError, match="batch 3 but the latent batch is 2"):
        CFGDenoiser(DiffusionModel.build(counting, SD1), p, n, 3.0, (2, 4, 8, 8))
    assert counting.calls == []


def test_files_load_in_both_layouts_and_bad_files_name_the_file(tmp_path):
    net = _net(7)
    ldm = save_controlnet(net, tmp_path / "cn.safetensors", dtype=torch.float32)
    loaded = load_controlnet(ldm)
    assert loaded.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    # a .pth pickle in the LDM layout, read weights-only
    pth = tmp_path / "cn.pth"
    torch.save({"state_dict": {"control_model." + k: v for k, v in net.state_dict().items()}}, pth)
    again = load_controlnet(pth, config=net.config)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.raises(FileExistsError):
        save_controlnet(net, ldm)

    state = {"control_model." + k: v for k, v in net.state_dict().items()}
    cases = {
        "sd.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "full SD checkpoint"),
        "xl.safetensors": ({**state, "control_model.label_emb.0.0.weight": torch.zeros(1)}, "SDXL ControlNet"),
        "lora.safetensors": ({"lora_controlnet": torch.zeros(1)}, "Control-LoRA"),
        "t2i.safetensors": ({"body.0.block1.weight": torch.zeros(1)}, "T2I-Adapter"),
        "other.safetensors": ({"foo.weight": torch.zeros(1)}, "not a ControlNet"),
        "short.safetensors": ({k: v for k, v in state.items() if "zero_convs.3" not in k}, "missing keys"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=message) as e:
            load_controlnet(tmp_path / name, config=net.config if name == "short.safetensors" else None)
        assert name in str(e.value)
    (tmp_path / "cut.safetensors").write_bytes(ldm.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_controlnet(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="file not found"):
        load_controlnet(tmp_path / "nope.safetensors")


def test_new_controlnet_from_unet_adds_nothing_until_trained(parts):
    unet = parts[0]
    net = ControlNet.from_unet(unet, hint_widths=(4, 8, 8, 16))
    assert torch.equal(net.input_blocks[1][0].in_layers[2].weight, unet.input_blocks[1][0].in_layers[2].weight)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, CFG.context_dim)
    res = net(x, torch.rand(2, 3, 64, 64), torch.tensor([10.0, 900.0]), ctx)
    assert all(r.abs().max() == 0 for r in res.skips + (res.middle,))
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor([10.0, 900.0]), ctx, control=res), unet(x, torch.tensor([10.0, 900.0]), ctx))
