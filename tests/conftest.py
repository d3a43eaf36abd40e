"""Shared fixtures. The full-size SD 1.5 model (random seeded weights, ~4.3 GB fp32) and its single-file
checkpoint are built once per test run, under the machine-wide full-size lock."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helper modules (_parity_util, ...)

from _parity_util import build_random, fullsize_lock, save_single_file  # noqa: E402

from glass_diffusion.sd_core.model import SDConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Tiny StableDiffusion with seeded random weights, and the same weights as a single-file checkpoint."""
    config = SDConfig.tiny()
    model = build_random(config, seed=0)
    path = save_single_file(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    return SimpleNamespace(model=model, path=path, config=config)


@pytest.fixture(scope="session")
def sd15_full(tmp_path_factory):
    """Full-size SD 1.5 with seeded random weights (fp32), and the same weights as a single-file checkpoint.
    Holds the full-size lock until the end of the session."""
    with fullsize_lock():
        config = SDConfig.sd15()
        model = build_random(config, seed=0)
        path = save_single_file(model, tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors")
        yield SimpleNamespace(model=model, path=path, config=config)
        del model
