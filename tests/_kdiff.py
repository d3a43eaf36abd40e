"""Load k-diffusion's `sampling.py` (the test reference) without its package __init__.

`import k_diffusion` needs torchvision / scikit-image, which this project does not install. sampling.py itself
(and external.py, the CompVis denoiser wrappers) needs only `utils.py` (which imports
torchvision.transforms.functional at module level) and torchdiffeq (used only by log_likelihood). Missing ones
are replaced by empty stub modules, then the files are loaded by path.
"""
import importlib.util
import sys
import types

import pytest


def _stub(name, added):
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except Exception:
        added.append(name)
        mod = types.ModuleType(name)
        mod.__path__ = []  # allow submodules
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)


def load():
    """Return k_diffusion.sampling, or skip the calling test when k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (test extra)")
    added = []
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchdiffeq"):
        _stub(name, added)
    if not hasattr(sys.modules["torchdiffeq"], "odeint"):
        sys.modules["torchdiffeq"].odeint = None
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    sys.modules["k_diffusion"] = pkg
    for sub in ("utils", "sampling", "external"):
        s = importlib.util.spec_from_file_location(f"k_diffusion.{sub}", f"{root}/{sub}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"k_diffusion.{sub}"] = m
        s.loader.exec_module(m)
        setattr(pkg, sub, m)
    for name in added:  # drop the stubs again: other libraries probe for torchvision with find_spec
        sys.modules.pop(name, None)
    return sys.modules["k_diffusion.sampling"]


def load_external():
    """k_diffusion.external (CompVisDenoiser, CompVisVDenoiser), loaded with sampling.py."""
    load()
    return sys.modules["k_diffusion.external"]
