"""Speed options are the same networks: channels-last and compiled forwards equal the eager default-layout
ones (fp32, within 1e-5 of the output scale), the fp16 VAE never returns non-finite pixels, and the bench
command runs and reports. Speed itself is never asserted here (see `glass-diffusion bench`)."""
import json

import pytest
import torch

from glass_diffusion.nodes import cli
from glass_diffusion.sd_core import builtin, speed
from glass_diffusion.sd_core.model import SDConfig
from glass_diffusion.sd_core.random_weights import build_random
from glass_diffusion.sd_core.sampling import txt2img


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def tiny():
    return build_random(SDConfig.tiny(), seed=5)


def _unet_inputs(cfg, batch=2, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, cfg.unet.in_channels, size, size, generator=g), torch.tensor([999.0, 312.5]),
            torch.randn(batch, 77, cfg.unet.context_dim, generator=g))


@torch.no_grad()
def test_channels_last_equals_default_layout(tiny):
    x, t, ctx = _unet_inputs(tiny.config)
    z = torch.randn(2, tiny.config.vae.latent_channels, 8, 8)
    ref_eps, ref_img = tiny.unet(x, t, ctx), tiny.vae.decode(z)
    ref_lat = tiny.vae.encode(ref_img.clamp(-1, 1)).mean
    speed.apply(tiny, speed.SpeedOptions(channels_last=True))
    w = tiny.unet.input_blocks[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    eps, img = tiny.unet(x, t, ctx), tiny.vae.decode(z)
    assert rel(eps, ref_eps) < 1e-5 and rel(img, ref_img) < 1e-5
    assert rel(tiny.vae.encode(ref_img.clamp(-1, 1)).mean, ref_lat) < 1e-5
    assert eps.is_contiguous() and img.is_contiguous()  # callers get the default layout back


@torch.no_grad()
@pytest.mark.parametrize("cin, cout, k, stride, pad, size, bias", [
    (32, 64, 3, 1, 1, 8, True), (64, 64, 3, 2, 1, 8, True), (96, 32, 1, 1, 0, 4, True), (16, 8, 3, 1, 1, 5, False)])
@pytest.mark.parametrize("layout", ["plain", "channels_last"])
def test_gemm_conv_equals_the_convolution(cin, cout, k, stride, pad, size, bias, layout, monkeypatch):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
    x = torch.randn(2, cin, size, size)
    if layout == "channels_last":
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    ref = conv(x)
    speed.use_gemm_convs(conv)
    direct = []
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: direct.append(1) or self._conv_forward(
        x, self.weight, self.bias))
    out = conv(x)
    assert type(conv) is speed.GemmConv2d and not direct  # the GEMM path ran
    assert out.shape == ref.shape and rel(out, ref) < 1e-5
    big = torch.randn(8, cin, 16, 16)  # 8 x 16 x 16 (or 8 x 8 x 8) positions > GEMM_CONV_MAX_ROWS: the convolution
    conv(big)
    assert direct


@torch.no_grad()
def test_gemm_convs_unet_equals_eager_and_survives_a_lora_view(tiny):
    import copy
    x, t, ctx = _unet_inputs(tiny.config)
    ref = tiny.unet(x, t, ctx)
    keys = list(tiny.unet.state_dict())
    speed.apply(tiny, speed.SpeedOptions(gemm_convs=True))
    assert list(tiny.unet.state_dict()) == keys
    assert rel(tiny.unet(x, t, ctx), ref) < 1e-5
    # a shallow copy with its own weight (what a LoRA view does) computes with that weight, not the original's
    conv = tiny.unet.input_blocks[0][0]
    view = copy.copy(conv)
    view._parameters = dict(conv._parameters, weight=torch.nn.Parameter(conv.weight * 2))
    z = torch.randn(1, conv.in_channels, 8, 8)
    assert torch.allclose(view(z) - conv.bias[:, None, None], 2 * (conv(z) - conv.bias[:, None, None]), atol=1e-5)


@torch.no_grad()
def test_vae_channels_last_is_the_vae_alone(tiny):
    z = torch.randn(1, tiny.config.vae.latent_channels, 8, 8)
    ref = tiny.vae.decode(z)
    speed.apply(tiny, speed.SpeedOptions(vae_channels_last=True))
    assert speed.memory_format_of(tiny.unet.input_blocks[0][0].weight) == torch.contiguous_format
    assert speed.memory_format_of(tiny.vae.decoder.conv_in.weight) == torch.channels_last
    img = tiny.vae.decode(z)
    assert rel(img, ref) < 1e-5 and img.is_contiguous()


@torch.no_grad()
def test_compiled_equals_eager(tiny):
    pytest.importorskip("torch._inductor")
    x, t, ctx = _unet_inputs(tiny.config)
    z = torch.randn(1, tiny.config.vae.latent_channels, 8, 8)
    ref_eps, ref_img = tiny.unet(x, t, ctx), tiny.vae.decode(z)
    keys = list(tiny.state_dict())
    speed.apply(tiny, speed.SpeedOptions(compile=True))
    try:
        eps, img = tiny.unet(x, t, ctx), tiny.vae.decode(z)
    except Exception as e:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    assert rel(eps, ref_eps) < 1e-5 and rel(img, ref_img) < 1e-5
    assert list(tiny.state_dict()) == keys  # compiled in place: checkpoint names unchanged


@torch.no_grad()
def test_fp16_vae_redoes_overflowing_decode_in_fp32(tiny):
    vae = tiny.vae
    vae.decoder.conv_in.weight.mul_(3e4)  # activations far past fp16's 65504; the next GroupNorm undoes the scale
    z = torch.randn(1, tiny.config.vae.latent_channels, 8, 8)
    ref = vae.decode(z)
    assert torch.isfinite(ref).all()
    half = vae.half()
    try:
        raw = half.decoder(half.post_quant_conv(z.half()))
    except RuntimeError as e:
        pytest.skip(f"fp16 convolutions unsupported on this CPU build: {e}")
    assert not torch.isfinite(raw).all()  # the case being guarded really overflows
    out = half.decode(z)
    assert torch.isfinite(out).all() and rel(out.float(), ref) < 1e-3
    assert half.post_quant_conv.weight.dtype == torch.float16  # the model itself stays fp16


def test_speed_option_parsing():
    assert speed.SpeedOptions.parse("channels_last,compile=max-autotune") == speed.SpeedOptions(
        channels_last=True, compile=True, compile_mode="max-autotune")
    assert speed.SpeedOptions.parse("none") == speed.SpeedOptions()
    assert speed.SpeedOptions.parse(speed.SpeedOptions(True, True).label()) == speed.SpeedOptions(True, True)
    wide, narrow = SDConfig.sd15().unet.model_channels, SDConfig.tiny().unet.model_channels
    assert speed.SpeedOptions.parse("default", "cpu", wide) == speed.SpeedOptions(gemm_convs=True,
                                                                                  vae_channels_last=True)
    assert speed.SpeedOptions.parse("gemm_convs,vae_channels_last").label() == "vae_channels_last,gemm_convs"
    assert speed.SpeedOptions.parse("default", "cuda", wide) == speed.SpeedOptions(channels_last=True)
    assert speed.SpeedOptions.parse("gemm_convs").label() == "gemm_convs"
    assert speed.SpeedOptions.parse("default", "cpu", narrow) == speed.SpeedOptions()
    with pytest.raises(ValueError, match="unknown speed option 'chanels_last'"):
        speed.SpeedOptions.parse("chanels_last")
    with pytest.raises(ValueError, match="compile_mode"):
        speed.SpeedOptions.parse("compile=fastest")


@torch.no_grad()
def test_channels_last_sampling_gives_the_same_picture():
    model, tokenizer = builtin.load()
    kw = dict(width=64, height=64, seed=3, steps=4, cfg=3.0)
    prompt = "a large red circle in the center on a blue background"
    ref = txt2img(model, tokenizer, prompt, **kw)
    speed.apply(model, speed.SpeedOptions(channels_last=True))
    # per call the two layouts agree to ~1e-6; four sampling steps amplify that to at most ~1/255 of a pixel
    assert rel(txt2img(model, tokenizer, prompt, **kw), ref) < 1e-2


def test_bench_command_reports_every_engine_and_measure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--checkpoint", str(builtin.CHECKPOINT), "--device", "cpu", "--res", "64",
                   "--steps", "2", "--repeats", "1", "--engines", "", "--glass", "none;channels_last",
                   "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("load s", "t2i batch 1", "unet_step batch 1", "vae_decode batch 1", "peak RSS GiB"):
        assert row in text
    res = json.loads(out.read_text())
    assert list(res["engines"]) == ["glass[none]", "glass[channels_last]"]
    for eng in res["engines"].values():
        assert eng["memory"]["peak_rss_bytes"] > 0
        for op in ("t2i@1", "unet_step@1", "vae_decode@1"):
            (reply,) = eng[op]  # one measured repeat after the warm-up
            assert reply["seconds"] > 0 and reply["finite"]


def test_bench_refuses_comfyui_without_a_checkout(capsys):
    rc = cli.main(["bench", "--engines", "comfyui", "--checkpoint", str(builtin.CHECKPOINT)])
    assert rc == cli.INVALID
    assert "--comfyui DIR" in capsys.readouterr().err


def test_bench_engine_that_dies_is_one_error_line(tmp_path, capsys):
    import sys
    rc = cli.main(["bench", "--engines", "comfyui", "--comfyui", str(tmp_path), "--comfyui-python", sys.executable,
                   "--checkpoint", str(builtin.CHECKPOINT), "--device", "cpu", "--glass", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: bench engine 'comfyui' exited" in err and "Traceback (most recent call last)" not in \
        err.split("error: bench engine")[-1]


def test_checkpoint_loader_speed_input():
    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    from glass_diffusion.nodes.types import NodeInputError

    def first_weight(unet):
        return unet.model.unet.input_blocks[0][0].weight

    unet = GlassCheckpointLoader().load(builtin.NAME, "fp32", speed="channels_last")[0]
    assert speed.memory_format_of(first_weight(unet)) == torch.channels_last
    unet = GlassCheckpointLoader().load(builtin.NAME, "fp32")[0]  # default: glass-tiny is narrow, plain layout
    assert speed.memory_format_of(first_weight(unet)) == torch.contiguous_format
    with pytest.raises(NodeInputError, match="GlassCheckpointLoader: input 'speed'"):
        GlassCheckpointLoader().load(builtin.NAME, "fp32", speed="fastest")


# bf16 against fp32 (the stated tolerances, README "Speed"): bf16 keeps 8 mantissa bits, so one UNet call
# differs by about 1e-2 of its scale, and a picture by about 1e-3 on average, up to 0.09 (22/255) at a few
# pixels of a sharp edge (glass-tiny v2, 8 steps: measured 0.086 max, 0.0013 mean)
BF16_UNET_TOL, BF16_PIXEL_MAX, BF16_PIXEL_MEAN = 3e-2, 0.12, 2e-3


@torch.no_grad()
def test_bf16_unet_within_stated_tolerance_of_fp32(tiny):
    x, t, c = _unet_inputs(tiny.config)
    ref = tiny.unet(x, t, c)
    tiny.unet.to(torch.bfloat16)
    out = tiny.unet(x.bfloat16(), t, c.bfloat16()).float()
    err = rel(out, ref)
    assert 1e-5 < err < BF16_UNET_TOL, err  # (> 1e-5: it really ran in bf16)


def test_bf16_picture_within_stated_tolerance_of_fp32():
    model, tokenizer = builtin.load()
    kw = dict(width=64, height=64, seed=3, steps=8, cfg=3.0)
    prompt = "a large red circle in the center on a blue background"
    ref = txt2img(model, tokenizer, prompt, **kw)
    model.unet.to(torch.bfloat16)
    model.clip.to(torch.bfloat16)
    diff = (txt2img(model, tokenizer, prompt, **kw) - ref).abs()
    assert 0 < diff.max() < BF16_PIXEL_MAX and diff.mean() < BF16_PIXEL_MEAN, (diff.max(), diff.mean())


def test_cpu_bf16_support_read_from_cpu_flags():
    assert speed.cpu_has_bf16("processor: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n") is True
    assert speed.cpu_has_bf16("flags : fpu sse2 avx2 amx_bf16 amx_tile\n") is True
    assert speed.cpu_has_bf16("flags : fpu sse2 avx2 avx512f avx512bw\n") is False
    assert speed.cpu_has_bf16("Hardware : some ARM board\n") is None


def test_loader_notes_emulated_bf16(monkeypatch, caplog):
    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    for has, noted in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(speed, "cpu_has_bf16", lambda has=has: has)
        caplog.clear()
        with caplog.at_level("WARNING"):
            GlassCheckpointLoader().load(builtin.NAME, "bf16")
        assert ("bf16 on this CPU is emulated" in caplog.text) is noted, (has, caplog.text)
