"""Speed options: the same networks, laid out or compiled differently. Nothing here is a second copy of a network.

- ``channels_last``: convolution weights (UNet, VAE) in NHWC memory order; the networks compute in the memory
  format of their first convolution's weight (see ``memory_format_of``), so a whole forward pass stays NHWC.
  oneDNN (CPU) and cuDNN (GPU) run NHWC convolutions faster. Numerically it is a different summation order:
  results agree with the default layout within ~1e-5 of their scale in fp32 (tested).
- ``gemm_convs``: on the CPU, a UNet convolution with few output positions (batch x height x width at most
  ``GEMM_CONV_MAX_ROWS``: the 8x8 and 4x4 levels of a 256 px picture) runs as one matrix product over its
  unfolded input patches instead of oneDNN's direct convolution, which is slow there (its wide 1280-channel
  weights with few positions: measured 1.7x to 3.7x faster as a GEMM on a 2-core AVX-512 Xeon; at 512 and more
  positions the direct convolution wins). The module keeps its class's name and its weights; results agree with
  the direct convolution within ~1e-6 of their scale in fp32 (tested).
- ``compile``: ``torch.compile`` of the UNet and the VAE decoder in place (``nn.Module.compile``: parameter
  names and state_dict keys unchanged). ``compile_mode`` is torch.compile's mode: "default", or on CUDA
  "reduce-overhead" (CUDA graphs for fixed shapes, with torch's own fallback to eager when a shape changes)
  and "max-autotune". The first call of each new shape pays the compile time.

Lossy speed-ups (fp16 accumulation, token merging, step caching) are not offered here: every option of this
module leaves the picture the same within float rounding.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """/proc/cpuinfo, read once per process (every checkpoint load asks)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def cpu_has_bf16(cpuinfo: str | None = None):
    """True / False: whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX); None where it cannot
    be told (no /proc/cpuinfo). Without it, PyTorch emulates bf16 on the CPU and is slower than fp32."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            return None
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    if not flags:
        return None
    return any(f in flags for f in CPU_BF16_FLAGS)


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = False
    vae_channels_last: bool = False  # NHWC for the VAE alone (channels_last: both networks)
    gemm_convs: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self):
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    @classmethod
    def default_for(cls, device, model_channels: int) -> "SpeedOptions":
        """What a loader uses when asked for nothing special ("default"), for wide UNets (SD 1.x / 2.x: 320
        channels): on the CPU the GEMM path for the UNet's convolutions with few positions in the default layout
        (the SD 1.5 UNet step at 256 px measured 1.38x faster than plain on a 2-core AVX-512 Xeon, where NHWC was
        15 % slower than plain, although 2.2x faster on another Xeon of the same kind) and an NHWC VAE (its decode
        at 256 px 3.63 s -> 3.04 s there), on CUDA NHWC for both; narrow UNets (glass-tiny: 64 channels, where NHWC
        measured 4.7x slower) get the plain layout; never compiled."""
        kind = torch.device(device).type
        wide = model_channels >= 256
        return cls(channels_last=kind == "cuda" and wide, gemm_convs=kind == "cpu" and wide,
                   vae_channels_last=kind == "cpu" and wide)

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
        parts = (["channels_last"] * self.channels_last + ["vae_channels_last"] * self.vae_channels_last
                 + ["gemm_convs"] * self.gemm_convs
                 + [f"compile={self.compile_mode}"] * self.compile)
        return ",".join(parts) or "none"


def memory_format_of(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a network computes in: that of its first convolution's 4-D weight."""
    if weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


GEMM_CONV_MAX_ROWS = 256  # batch x output positions up to which a GEMM beats the direct convolution (see above)


class GemmConv2d(torch.nn.Conv2d):
    """nn.Conv2d that computes as one batched matrix product over unfolded patches when the output has at most
    GEMM_CONV_MAX_ROWS positions on the CPU, and as the usual convolution otherwise. ``apply`` turns a loaded
    model's Conv2d modules into this class in place (same parameters, same state_dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        B, C, H, W = x.shape
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if x.device.type != "cpu" or B * Ho * Wo > GEMM_CONV_MAX_ROWS or self.groups != 1:
            return super().forward(x)
        w = self.weight
        O = w.shape[0]
        if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
            cols = x.reshape(B, C, H * W)                                              # [B, C, L]
            w2 = w.reshape(O, C)                                                       # [O, C] (a view either way)
        else:
            cols = torch.nn.functional.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw),
                                              stride=(sh, sw))                         # [B, C*kh*kw, L], (C, kh, kw)
            if w.is_contiguous():
                w2 = w.reshape(O, -1)                                                  # [O, C*kh*kw]
            else:  # NHWC weights: the (kh, kw, C) order is the view; reorder the (small) patches to match
                w2 = w.permute(0, 2, 3, 1).reshape(O, -1)                              # [O, kh*kw*C]
                cols = cols.reshape(B, C, kh * kw, -1).transpose(1, 2).reshape(B, kh * kw * C, -1)
        out = torch.matmul(w2, cols)                                                   # [B, O, L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.reshape(B, O, Ho, Wo)


def use_gemm_convs(net: torch.nn.Module) -> None:
    """Turn every plain Conv2d of ``net`` into a GemmConv2d, in place."""
    for m in net.modules():
        if type(m) is torch.nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.__class__ = GemmConv2d


def apply(model, options: SpeedOptions):
    """Apply the options in place to a StableDiffusion-like object with .unet and .vae (either may be None)."""
    nets = [n for n in (getattr(model, "unet", None), getattr(model, "vae", None)) if n is not None]
    if options.gemm_convs and getattr(model, "unet", None) is not None:
        use_gemm_convs(model.unet)
    for net in nets:
        if options.channels_last or (options.vae_channels_last and net is getattr(model, "vae", None)):
            net.to(memory_format=torch.channels_last)
    if options.compile:
        unet, vae = getattr(model, "unet", None), getattr(model, "vae", None)
        if unet is not None:
            unet.compile(mode=options.compile_mode, dynamic=False)
        if vae is not None:
            vae.decoder.compile(mode=options.compile_mode, dynamic=False)
    return model
