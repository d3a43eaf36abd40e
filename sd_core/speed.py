"""Speed options: the same networks, laid out or compiled differently. Nothing here is a second copy of a network.

- ``channels_last``: convolution weights (UNet, VAE) in NHWC memory order; the networks compute in the memory
  format of their first convolution's weight (see ``memory_format_of``), so a whole forward pass stays NHWC.
  oneDNN (CPU) and cuDNN (GPU) run NHWC convolutions faster. Numerically it is a different summation order:
  results agree with the default layout within ~1e-5 of their scale in fp32 (tested).
- ``compile``: ``torch.compile`` of the UNet and the VAE decoder in place (``nn.Module.compile``: parameter
  names and state_dict keys unchanged). ``compile_mode`` is torch.compile's mode: "default", or on CUDA
  "reduce-overhead" (CUDA graphs for fixed shapes, with torch's own fallback to eager when a shape changes)
  and "max-autotune". The first call of each new shape pays the compile time.

Lossy speed-ups (fp16 accumulation, token merging, step caching) are not offered here: every option of this
module leaves the picture the same within float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic


def cpu_has_bf16(cpuinfo: str | None = None):
    """True / False: whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX); None where it cannot
    be told (no /proc/cpuinfo). Without it, PyTorch emulates bf16 on the CPU and is slower than fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    if not flags:
        return None
    return any(f in flags for f in CPU_BF16_FLAGS)


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self):
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    @classmethod
    def default_for(cls, device, model_channels: int) -> "SpeedOptions":
        """What a loader uses when asked for nothing special ("default"): NHWC for wide UNets (SD 1.x / 2.x: 320
        channels; measured 2.2x faster for the SD 1.5 UNet on a 2-core AVX-512 CPU), the default layout for narrow
        ones (glass-tiny: 64 channels, where NHWC measured 4.7x slower); never compiled."""
        return cls(channels_last=torch.device(device).type in ("cpu", "cuda") and model_channels >= 256)

    @classmethod
    def parse(cls, text: str, device="cpu", model_channels: int = 0) -> "SpeedOptions":
        """"channels_last,compile" / "compile=max-autotune" / "none" / "" -> options (a comma list of flags);
        "default" -> default_for(device, model_channels)."""
        if (text or "").strip() == "default":
            return cls.default_for(device, model_channels)
        opts: dict = {}
        names = {f.name for f in fields(cls)} - {"compile_mode"}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            if item == "none":
                continue
            name, _, value = item.partition("=")
            if name not in names:
                raise ValueError(f"unknown speed option {name!r}; choose from {sorted(names)} or 'none'")
            opts[name] = True
            if name == "compile" and value:
                opts["compile_mode"] = value
        return cls(**opts)

    def label(self) -> str:
        parts = ["channels_last"] * self.channels_last + [f"compile={self.compile_mode}"] * self.compile
        return ",".join(parts) or "none"


def memory_format_of(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a network computes in: that of its first convolution's 4-D weight."""
    if weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def apply(model, options: SpeedOptions):
    """Apply the options in place to a StableDiffusion-like object with .unet and .vae (either may be None)."""
    nets = [n for n in (getattr(model, "unet", None), getattr(model, "vae", None)) if n is not None]
    for net in nets:
        if options.channels_last:
            net.to(memory_format=torch.channels_last)
    if options.compile:
        unet, vae = getattr(model, "unet", None), getattr(model, "vae", None)
        if unet is not None:
            unet.compile(mode=options.compile_mode, dynamic=False)
        if vae is not None:
            vae.decoder.compile(mode=options.compile_mode, dynamic=False)
    return model
