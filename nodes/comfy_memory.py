"""Our networks under ComfyUI's model management (inside ComfyUI only: headless every function here returns at once).

ComfyUI keeps a list of the models it has loaded and unloads the least needed one when another model needs the
memory (and on the "Unload Models" / "Free model and node cache" buttons). Our loaders register each network
(UNet, text encoder, VAE, ControlNet) there, wrapped in ComfyUI's own ``ModelPatcher`` as ComfyUI wraps its
CLIP-vision and upscale models; the nodes call ``use(...)`` before they run a network, which asks ComfyUI to load
it (ComfyUI frees what it must first), so our models are offloaded and reloaded like ComfyUI's own.

The patcher holds a small ``GlassHeldNetwork`` module around the network: ComfyUI writes its bookkeeping attributes
(``device``, ``model_loaded_weight_memory``, ...) on the holder, never on our networks.

On a CPU-only ComfyUI the offload device is the same memory as the load device, so ComfyUI's unload would free
nothing: there an unload releases the weights instead (every parameter and buffer becomes an empty tensor; the
module tree stays) and the next ``use`` reads them again from the file they came from, in the same dtype and
memory format. LoRA views keep sharing the weights (the Parameter objects stay the same).
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Callable, Mapping

import torch

from . import progress

_entries: "weakref.WeakKeyDictionary[torch.nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_warned: list = []
log = logging.getLogger(__name__)


class GlassHeldNetwork(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: a holder of one of our networks."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net


class _Entry:
    def __init__(self, net: torch.nn.Module, reload: Callable[[], Mapping[str, torch.Tensor]], kind: str):
        import comfy.model_management as mm
        import comfy.model_patcher
        from comfy.patcher_extension import CallbacksMP
        load = mm.get_torch_device()
        offload = {"text_encoder": mm.text_encoder_offload_device, "vae": mm.vae_offload_device}.get(
            kind, mm.unet_offload_device)()
        self.net = weakref.ref(net)
        self.reload = reload
        self.released = False
        self.patcher = comfy.model_patcher.ModelPatcher(GlassHeldNetwork(net), load_device=load, offload_device=offload)
        self.patcher.add_callback(CallbacksMP.ON_DETACH, self._on_detach)

    def _on_detach(self, patcher, unpatch_all) -> None:
        """ComfyUI unloaded this model; where that moved nothing out of RAM, release the weights. (ComfyUI also
        detaches with unpatch_all=False to load a model again that is already loaded, and when a patcher is
        garbage collected: neither is an unload.)"""
        net = self.net()
        if net is not None and unpatch_all and patcher.load_device.type == "cpu" and patcher.offload_device.type == "cpu":
            release(net)
            self.released = True

    def restore(self) -> None:
        net = self.net()
        if self.released and net is not None:
            restore(net, self.reload())
            self.patcher.size = 0  # measured again from the restored weights
            self.released = False


def _tensors(net: torch.nn.Module):
    """(owner module, attribute, tensor, is a parameter) for every parameter and buffer, each once."""
    seen = set()
    for module in net.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield module, name, t, is_param


def release(net: torch.nn.Module) -> None:
    """Free the weights of ``net`` in place: each parameter and buffer keeps its identity (LoRA views and
    compiled graphs still point at it) and becomes an empty tensor of its dtype. ``restore`` undoes it."""
    for module, name, t, is_param in _tensors(net):
        empty = torch.empty(0, dtype=t.dtype, device=t.device)
        if is_param:
            t.data = empty
        else:
            module._buffers[name] = empty


def restore(net: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put the weights of ``state`` (the network's own state_dict names) back into a released ``net``,
    on the device and in the dtype and memory format the released tensors had."""
    names = {id(t): n for n, t in net.state_dict(keep_vars=True).items()}
    for module, name, t, is_param in list(_tensors(net)):
        full = names.get(id(t))
        if full is None or full not in state:
            raise RuntimeError(f"cannot reload {full or name}: the file no longer holds it")
        new = state[full].to(device=t.device, dtype=t.dtype)
        if new.ndim == 4 and getattr(t, "_glass_channels_last", False):
            new = new.contiguous(memory_format=torch.channels_last)
        if is_param:
            t.data = new
        else:
            module._buffers[name] = new


def _remember_layout(net: torch.nn.Module) -> None:
    for _, _, t, _ in _tensors(net):
        if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            t._glass_channels_last = True


def register(net: torch.nn.Module, reload: Callable[[], Mapping[str, torch.Tensor]], kind: str = "unet") -> None:
    """Put ``net`` under ComfyUI's model management. ``reload()`` returns its weights again (read from the
    file it came from) for a CPU-only ComfyUI that released them. kind: 'unet' | 'text_encoder' | 'vae' |
    'control' (which offload device ComfyUI gives it)."""
    if not progress.in_comfyui():
        return
    with _lock:
        if net in _entries:
            return
        try:
            entry = _Entry(net, reload, kind)
        except (ImportError, AttributeError) as e:  # a ComfyUI (or stand-in) without this model-management API
            if not _warned:
                _warned.append(True)
                log.warning("Glass Diffusion: ComfyUI's model management is not available (%s); our models stay "
                            "loaded until ComfyUI drops them from its cache", e)
            return
        _remember_layout(net)
        _entries[net] = entry


def use(*nets: torch.nn.Module, memory_required: int = 0) -> None:
    """Before running these networks: have ComfyUI load them (and free other models if it must)."""
    if not progress.in_comfyui():
        return
    import comfy.model_management as mm
    with _lock:
        entries = [_entries[n] for n in nets if n is not None and n in _entries]
        for e in entries:
            e.restore()
    if entries:
        mm.load_models_gpu([e.patcher for e in entries], memory_required=memory_required)


def registered(net: torch.nn.Module) -> bool:
    return net in _entries
