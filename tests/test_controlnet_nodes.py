"""The ControlNet nodes (loader, apply) and the control-image preprocessors, through the node classes."""
import pytest
import torch
from _parity_util import random_init_

from glass_diffusion.nodes import controlnet as cn_nodes
from glass_diffusion.nodes import runtime
from glass_diffusion.nodes.types import NodeInputError
from glass_diffusion.sd_core import builtin
from glass_diffusion.sd_core.controlnet import CONTROL_KEY, ControlNet, ControlNetConfig, save_controlnet
from glass_diffusion.sd_core.unet import UNetConfig

CFG = ControlNetConfig(UNetConfig.tiny(), hint_widths=(4, 8, 8, 16))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_models")
    (root / "controlnet" / "sub").mkdir(parents=True)
    torch.manual_seed(0)
    save_controlnet(random_init_(ControlNet(CFG), 0), root / "controlnet" / "sub" / "tiny_cn.safetensors",
                    dtype=torch.float32)
    (root / "controlnet" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with runtime.settings_override(models_dir=root, device="cpu", dtype="fp32"):
        yield root


def _cond(width=32, n=1):
    return [[torch.randn(1, 77, width), {"pooled_output": None}] for _ in range(n)]


def test_loader_lists_builtin_first_and_loads_files(models):
    names = cn_nodes.GlassControlNetLoader.INPUT_TYPES()["required"]["control_net_name"][0]
    assert "sub/tiny_cn.safetensors" in names and "broken.safetensors" in names
    assert (builtin.CONTROLNET_NAME in names) == builtin.CONTROLNET.is_file()
    assert names[0] == builtin.CONTROLNET_NAME or not builtin.CONTROLNET.is_file()
    (net,) = cn_nodes.GlassControlNetLoader().load("sub/tiny_cn.safetensors", "fp32")
    assert net.model.config == CFG and "tiny_cn" in repr(net)
    with pytest.raises(NodeInputError, match=r"GlassControlNetLoader: input 'control_net_name': no file 'nope"):
        cn_nodes.GlassControlNetLoader().load("nope.safetensors")
    with pytest.raises(ValueError, match="broken.safetensors"):
        cn_nodes.GlassControlNetLoader().load("broken.safetensors")


def test_apply_node_chains_and_validates(models):
    (net,) = cn_nodes.GlassControlNetLoader().load("sub/tiny_cn.safetensors", "fp32")
    apply = cn_nodes.GlassControlNetApply().apply
    pos, neg, image = _cond(n=2), _cond(), torch.rand(1, 40, 40, 3)
    p1, n1 = apply(pos, neg, net, image, 0.8, 0.1, 0.9)
    a = p1[0][1][CONTROL_KEY]
    assert a is p1[1][1][CONTROL_KEY] is n1[0][1][CONTROL_KEY]
    assert (a.strength, a.start_percent, a.end_percent) == (0.8, 0.1, 0.9)
    assert p1[0][0] is pos[0][0] and CONTROL_KEY not in pos[0][1] and p1[0][1]["pooled_output"] is None
    p2, n2 = apply(p1, n1, net, image, 1.5, 0.0, 1.0)
    assert [x.strength for x in p2[0][1][CONTROL_KEY].chain()] == [0.8, 1.5]
    assert apply(pos, neg, net, image, 0.0, 0.0, 1.0) == (pos, neg)  # strength 0: unchanged, as ComfyUI
    # what ComfyUI's conditioning nodes do to an entry (copy the dict, add keys) keeps our control
    combined = p2 + [[t, {**d, "area": (8, 8, 0, 0), "strength": 1.0}] for t, d in p2]
    assert all(d[CONTROL_KEY] is p2[0][1][CONTROL_KEY] for _, d in combined)

    bad = [
        (dict(image=torch.full((1, 8, 8, 3), float("nan"))), "image", "NaN"),
        (dict(image=torch.rand(1, 3, 8, 8)), "image", r"\[B, H, W, 3\]"),
        (dict(strength=11.0), "strength", "0..10"),
        (dict(strength=float("nan")), "strength", "0..10"),
        (dict(start_percent=0.9, end_percent=0.2), "start_percent", "after end_percent"),
        (dict(end_percent=1.5), "end_percent", "0..1"),
        (dict(positive=_cond(width=768)), "positive", r"not \[B, tokens, 32\]"),
        (dict(negative=[]), "negative", "non-empty"),
        (dict(control_net="x"), "control_net", "GLASS_CONTROL_NET"),
    ]
    for change, name, message in bad:
        kw = {**dict(positive=pos, negative=neg, control_net=net, image=image, strength=1.0, start_percent=0.0,
                     end_percent=1.0), **change}
        with pytest.raises(NodeInputError, match=f"GlassControlNetApply: input '{name}': .*{message}"):
            apply(**kw)


def test_canny_edges_thresholds_and_hysteresis():
    img = torch.zeros(1, 48, 48, 3)
    img[:, 12:36, 12:36] = 1.0  # a white square: strong edges
    (edges,) = cn_nodes.GlassCannyEdges().edges(img, 0.4, 0.8)
    assert edges.shape == img.shape and set(edges.unique().tolist()) <= {0.0, 1.0}
    e = edges[0, :, :, 0]
    assert e[12:36, 12:36].sum() > 0 and e[:10].sum() == 0 and e[20:28, 20:28].sum() == 0  # on the border only
    assert e[24, 10:15].sum() >= 1 and e.sum() < 4 * 24 * 3  # thin: about one pixel across

    faint = img * 0.5  # contrast 0.5: between the thresholds, not connected to any strong edge -> dropped
    assert cn_nodes.GlassCannyEdges().edges(faint, 0.4, 0.8)[0].sum() == 0
    assert cn_nodes.GlassCannyEdges().edges(faint, 0.2, 0.4)[0].sum() > 0
    half = img.clone()
    half[:, 12:36, 24:36] = 0.5  # the right half faint: kept where it joins the strong left half (hysteresis)
    e = cn_nodes.GlassCannyEdges().edges(half, 0.3, 0.8)[0][0, :, :, 0]
    assert e[:, 30:].sum() > 0
    assert cn_nodes.GlassCannyEdges().edges(half, 0.45, 0.8)[0][0, :, 30:, 0].sum() == 0
    with pytest.raises(NodeInputError, match="low_threshold"):
        cn_nodes.GlassCannyEdges().edges(img, 0.9, 0.5)
    with pytest.raises(NodeInputError, match="NaN"):
        cn_nodes.GlassCannyEdges().edges(torch.full((1, 8, 8, 3), float("nan")))


def test_invert_mask_and_shape_nodes():
    from glass_diffusion.sd_core.control_images import SHAPES
    assert tuple(cn_nodes.SHAPES) == SHAPES
    img = torch.rand(2, 8, 8, 3)
    assert torch.equal(cn_nodes.GlassInvertImage().invert(img)[0], 1 - img)
    mask = torch.zeros(2, 8, 8)
    mask[1, 2:4, 2:4] = 1
    (out,) = cn_nodes.GlassMaskToControlImage().convert(mask)
    assert out.shape == (2, 8, 8, 3) and torch.equal(out[..., 1], mask)
    assert cn_nodes.GlassMaskToControlImage().convert(mask[1])[0].shape == (1, 8, 8, 3)
    (square,) = cn_nodes.GlassShapeMask().draw("square", 64, 32, 20.0, 10.0, 4.0)
    assert square.shape == (1, 32, 64) and square.sum() == 64  # 8 x 8 pixels
    ys, xs = torch.nonzero(square[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (6, 13, 16, 23)
    (circle,) = cn_nodes.GlassShapeMask().draw("circle", 64, 64, 32.0, 32.0, 10.0)
    assert abs(circle.sum().item() - 3.14159 * 100) < 6
    (tri,) = cn_nodes.GlassShapeMask().draw("triangle", 64, 64, 32.0, 32.0, 10.0)
    assert abs(tri.sum().item() - 200) < 6 and tri[0, 23].sum() < tri[0, 40].sum()  # apex up
    with pytest.raises(NodeInputError, match="shape"):
        cn_nodes.GlassShapeMask().draw("star")
