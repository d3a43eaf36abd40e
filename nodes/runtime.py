"""Headless runtime settings the nodes read: models, input and output folders, device, dtype.

The CLI fills them from ``--models/--input/--output/--device/--dtype/--allow-nan``; library users call
``configure`` or use ``settings_override`` as a context manager. Defaults come from the environment variables
GLASS_DIFFUSION_MODELS / GLASS_DIFFUSION_INPUT / GLASS_DIFFUSION_OUTPUT / GLASS_DIFFUSION_MAX_MEMORY_GB /
GLASS_DIFFUSION_MAX_WORK (read when this module is imported), else ``./models``, ``./input``, ``./output``
and the limits below. Inside ComfyUI the nodes use ``folder_paths`` and ComfyUI's device management instead.

Per run, not per process: ``settings_override`` sets a context variable, so two runs in two threads (or in
two asyncio tasks) each see their own settings; ``configure`` outside any override changes the process-wide
defaults every new context starts from. (A thread started inside an override starts from those defaults:
run it with ``contextvars.copy_context().run`` to hand the override on.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")
# The work a graph may ask for before it is refused at validation (nodes/budget.py): latent pixels x batch x
# (guidance copies) x sampling steps, summed over the graph. 2**31 is e.g. 512x512 x batch 8 x 2 x 8,000 steps,
# about an hour of GPU work for SD 1.5, days on a CPU; set GLASS_DIFFUSION_MAX_WORK to change it.
DEFAULT_MAX_WORK = 2 ** 31


def _env_float(name: str) -> Optional[float]:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


@dataclass
class RuntimeSettings:
    models_dir: Path
    output_dir: Path
    input_dir: Path = Path("input")
    device: str = "auto"  # "auto" | "cpu" | "cuda" (or "cuda:N")
    dtype: str = "auto"   # "auto" | "fp32" | "fp16" | "bf16"
    allow_nan: bool = False  # True: non-finite UNet / VAE outputs do not stop the run (debugging)
    max_memory_gb: Optional[float] = None  # the memory a graph may plan to use; None: what the device has free
    max_work: float = DEFAULT_MAX_WORK  # see DEFAULT_MAX_WORK

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
                           input_dir=Path(os.environ.get("GLASS_DIFFUSION_INPUT", "input")),
                           max_memory_gb=_env_float("GLASS_DIFFUSION_MAX_MEMORY_GB"),
                           max_work=_env_float("GLASS_DIFFUSION_MAX_WORK") or DEFAULT_MAX_WORK)


_process_settings = _defaults()  # what a context without an override sees; ``configure`` outside one changes it
_scoped: ContextVar[RuntimeSettings] = ContextVar("glass_runtime_settings")


def get_settings() -> RuntimeSettings:
    return _scoped.get(_process_settings)


def _changed(changes: dict) -> RuntimeSettings:
    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("models_dir", "output_dir", "input_dir"):
        if key in changes:
            changes[key] = Path(changes[key])
    if str(changes.get("device", "auto")).split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {changes['device']!r}")
    if changes.get("dtype", "auto") not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {changes['dtype']!r}")
    return dataclasses.replace(get_settings(), **changes)


def configure(**changes) -> RuntimeSettings:
    """Change some settings (None values are ignored); returns the new settings. Inside ``settings_override``
    this changes that override only; outside, the process-wide defaults."""
    global _process_settings
    new = _changed(changes)
    if _scoped.get(None) is None:
        _process_settings = new
    else:
        _scoped.set(new)
    return new


@contextlib.contextmanager
def settings_override(**changes):
    """``with settings_override(output_dir=tmp): ...``: these settings for this context only, restored after."""
    token = _scoped.set(_changed(changes))
    try:
        yield _scoped.get()
    finally:
        _scoped.reset(token)
