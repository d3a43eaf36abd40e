"""Headless runtime settings the nodes read: models, input and output folders, device, dtype.

The CLI fills them from ``--models/--input/--output/--device/--dtype``; library users call ``configure``
or use ``settings_override`` as a context manager. Defaults come from the environment variables
GLASS_DIFFUSION_MODELS / GLASS_DIFFUSION_INPUT / GLASS_DIFFUSION_OUTPUT (read when this module is
imported), else ``./models``, ``./input`` and ``./output``.
Inside ComfyUI the nodes use ``folder_paths`` and ComfyUI's device management instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")


@dataclass
class RuntimeSettings:
    models_dir: Path
    output_dir: Path
    input_dir: Path = Path("input")
    device: str = "auto"  # "auto" | "cpu" | "cuda" (or "cuda:N")
    dtype: str = "auto"   # "auto" | "fp32" | "fp16" | "bf16"

    def torch_device(self):
        """"auto": CUDA when available, else CPU."""
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device=None):
        """"auto": fp16 on CUDA, fp32 elsewhere."""
        import torch
        if self.dtype == "auto":
            device = torch.device(device) if device is not None else self.torch_device()
            return torch.float16 if device.type == "cuda" else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]


def _defaults() -> RuntimeSettings:
    return RuntimeSettings(models_dir=Path(os.environ.get("GLASS_DIFFUSION_MODELS", "models")),
                           output_dir=Path(os.environ.get("GLASS_DIFFUSION_OUTPUT", "output")),
                           input_dir=Path(os.environ.get("GLASS_DIFFUSION_INPUT", "input")))


_settings = _defaults()


def get_settings() -> RuntimeSettings:
    return _settings


def configure(**changes) -> RuntimeSettings:
    """Change some settings (None values are ignored); returns the new settings."""
    global _settings
    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("models_dir", "output_dir", "input_dir"):
        if key in changes:
            changes[key] = Path(changes[key])
    if changes.get("device", "auto").split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {changes['device']!r}")
    if changes.get("dtype", "auto") not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {changes['dtype']!r}")
    _settings = dataclasses.replace(_settings, **changes)
    return _settings


@contextlib.contextmanager
def settings_override(**changes):
    """``with settings_override(output_dir=tmp): ...`` restores the previous settings afterwards."""
    global _settings
    saved = _settings
    try:
        yield configure(**changes)
    finally:
        _settings = saved
