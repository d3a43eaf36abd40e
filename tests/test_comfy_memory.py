"""Our networks under ComfyUI's model management (nodes/comfy_memory.py), against a stand-in of the part of
ComfyUI's API the pack uses (comfy.model_management.load_models_gpu, comfy.model_patcher.ModelPatcher with its
ON_DETACH callback). The real server was checked by hand (README, Speed)."""
import sys
import types

import pytest
import torch

from glass_diffusion.nodes import comfy_memory
from glass_diffusion.nodes.lora import BUILTIN_NAME as BUILTIN_LORA
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS as NODES
from glass_diffusion.sd_core import builtin

CPU = torch.device("cpu")


class FakeComfy:
    """comfy.model_management / model_patcher / patcher_extension / utils, as far as the pack calls them."""

    def __init__(self):
        self.loaded_calls = []  # one list of patchers per load_models_gpu call
        self.patchers = []
        fake = self

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0):
                self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
                self.callbacks = {}
                fake.patchers.append(self)

            def add_callback(self, kind, fn):
                self.callbacks.setdefault(kind, []).append(fn)

            def detach(self, unpatch_all=True):  # what ComfyUI's unload ends in
                self.model.to(self.offload_device)
                for fn in self.callbacks.get("on_detach_after", []):
                    fn(self, unpatch_all)

        class ProgressBar:
            def __init__(self, total):
                pass

            def update_absolute(self, value, total=None, preview=None):
                pass

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = mm.unet_offload_device = mm.text_encoder_offload_device = mm.vae_offload_device = \
            lambda: CPU
        mm.load_models_gpu = lambda models, memory_required=0: self.loaded_calls.append(list(models))
        mm.throw_exception_if_processing_interrupted = lambda: None
        mp = types.ModuleType("comfy.model_patcher")
        mp.ModelPatcher = ModelPatcher
        ext = types.ModuleType("comfy.patcher_extension")
        ext.CallbacksMP = types.SimpleNamespace(ON_DETACH="on_detach_after")
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.model_patcher, comfy.patcher_extension, comfy.utils = mm, mp, ext, utils
        self.modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": mp,
                        "comfy.patcher_extension": ext, "comfy.utils": utils}


@pytest.fixture
def comfy(monkeypatch):
    fake = FakeComfy()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("glass_diffusion.nodes.progress.previews_enabled", lambda: False)
    return fake


def _picture(unet, clip, vae, seed=3):
    enc = NODES["GlassTextEncode"]()
    pos, neg = enc.encode(clip, "a red circle on a blue background")[0], enc.encode(clip, "")[0]
    latent = NODES["GlassEmptyLatent"]().generate(64, 64, 1)[0]
    out = NODES["GlassKSampler"]().sample(unet, seed, 4, 5.0, "euler", "normal", pos, neg, latent, 1.0)[0]
    return NODES["GlassVAEDecode"]().decode(out, vae)[0]


def _weights_bytes(net):
    return sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))


def test_headless_nothing_is_registered(caplog, monkeypatch):
    monkeypatch.setattr(comfy_memory, "_warned", [])  # (a stand-in ComfyUI of another test may have warned)
    with caplog.at_level("WARNING", logger=comfy_memory.log.name):
        unet, clip, vae = NODES["GlassCheckpointLoader"]().load(builtin.NAME, "fp32")
    assert not any(comfy_memory.registered(n) for n in (unet.model.unet, clip.model, vae.model))
    assert not caplog.records  # headless it does not even look for ComfyUI's model management


def test_models_load_through_comfyui_and_a_cpu_unload_frees_and_reloads_them(comfy):
    unet, clip, vae = NODES["GlassCheckpointLoader"]().load(builtin.NAME, "fp32")
    nets = {"unet": unet.model.unet, "clip": clip.model, "vae": vae.model}
    assert all(comfy_memory.registered(n) for n in nets.values())
    held = {id(p.model.net): p for p in comfy.patchers}
    assert set(held) == {id(n) for n in nets.values()}  # ComfyUI manages a holder, never our module itself
    assert all(not hasattr(n, "model_loaded_weight_memory") for n in nets.values())

    first = _picture(unet, clip, vae)
    used = [{id(p.model.net) for p in call} for call in comfy.loaded_calls]
    assert used == [{id(nets["clip"])}, {id(nets["clip"])}, {id(nets["unet"])}, {id(nets["vae"])}]

    sizes = {k: _weights_bytes(n) for k, n in nets.items()}
    params = {k: [id(p) for p in n.parameters()] for k, n in nets.items()}
    for p in comfy.patchers:  # ComfyUI loading an already loaded model again: detached, not unloaded
        p.detach(unpatch_all=False)
    assert {k: _weights_bytes(n) for k, n in nets.items()} == sizes
    for p in comfy.patchers:  # ComfyUI needs the memory: it unloads every model (CPU-only: offload = same RAM)
        p.detach()
    assert all(_weights_bytes(n) == 0 for n in nets.values())  # the weights are gone, not moved

    again = _picture(unet, clip, vae)  # the next use reads them back from the file
    assert {k: _weights_bytes(n) for k, n in nets.items()} == sizes
    assert {k: [id(p) for p in n.parameters()] for k, n in nets.items()} == params  # same Parameter objects
    assert torch.equal(first, again)


def test_a_lora_view_keeps_working_after_an_unload(comfy):
    unet, clip, vae = NODES["GlassCheckpointLoader"]().load(builtin.NAME, "fp32")
    lora_unet, lora_clip = NODES["GlassLoraLoader"]().load(unet, clip, BUILTIN_LORA, 1.0, 1.0)
    before = _picture(lora_unet, lora_clip, vae)
    plain = _picture(unet, clip, vae)
    for p in comfy.patchers:
        p.detach()
    assert torch.equal(_picture(lora_unet, lora_clip, vae), before)
    assert torch.equal(_picture(unet, clip, vae), plain)
    assert not torch.equal(before, plain)


def test_release_and_restore_keep_dtype_and_memory_format():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8)).to(torch.bfloat16)
    net = net.to(memory_format=torch.channels_last)
    comfy_memory._remember_layout(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    comfy_memory.release(net)
    assert _weights_bytes(net) == 0
    comfy_memory.restore(net, {k: v.float().contiguous() for k, v in state.items()})
    assert net[0].weight.dtype == torch.bfloat16 and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_chained_controlnets_are_loaded_with_the_unet(comfy):
    from glass_diffusion.sd_core.builtin import CONTROLNET_NAME
    unet, clip, vae = NODES["GlassCheckpointLoader"]().load(builtin.NAME, "fp32")
    net = NODES["GlassControlNetLoader"]().load(CONTROLNET_NAME, "fp32")[0]
    enc = NODES["GlassTextEncode"]()
    pos, neg = enc.encode(clip, "a red circle")[0], enc.encode(clip, "")[0]
    mask = NODES["GlassShapeMask"]().draw("circle", 64, 64, 32.0, 32.0, 20.0)[0]
    image = NODES["GlassMaskToControlImage"]().convert(mask)[0]
    apply = NODES["GlassControlNetApply"]()
    pos, neg = apply.apply(pos, neg, net, image, 1.0, 0.0, 1.0)
    pos, neg = apply.apply(pos, neg, net, image, 0.5, 0.0, 0.5)  # the same network twice in one chain
    latent = NODES["GlassEmptyLatent"]().generate(64, 64, 1)[0]
    comfy.loaded_calls.clear()
    NODES["GlassKSampler"]().sample(unet, 1, 2, 5.0, "euler", "normal", pos, neg, latent, 1.0)
    assert [[p.model.net for p in call] for call in comfy.loaded_calls] == [[unet.model.unet, net.model]]
