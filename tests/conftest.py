"""Shared fixtures. The full-size SD 1.5 model (random seeded weights, ~4.3 GB fp32) and its single-file
checkpoint are built once per test run, under the machine-wide full-size lock, and released (memory, file
and lock) right after the last test marked `fullsize`, not at the end of the session."""
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helper modules (_parity_util, ...)

from _parity_util import build_random, fullsize_lock, save_single_file  # noqa: E402

from glass_diffusion.sd_core.model import SDConfig  # noqa: E402

_open_fullsize = []  # the live sd15_full resources (at most one)


def pytest_configure(config):
    config.addinivalue_line("markers", "fullsize: uses the full-size SD 1.5 fixture (sd15_full); "
                                       "deselect with -m 'not fullsize'")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Tiny StableDiffusion with seeded random weights, and the same weights as a single-file checkpoint."""
    config = SDConfig.tiny()
    model = build_random(config, seed=0)
    path = save_single_file(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    return SimpleNamespace(model=model, path=path, config=config)


class _FullSize(SimpleNamespace):
    def close(self):
        if self.stack is not None:
            self.model = None
            self.path.unlink(missing_ok=True)
            self.stack, stack = None, self.stack
            stack.close()  # releases the lock


@pytest.fixture(scope="session")
def sd15_full(tmp_path_factory):
    """Full-size SD 1.5 with seeded random weights (fp32), and the same weights as a single-file checkpoint.
    Tests using it must carry the `fullsize` marker (see pytest_runtest_teardown)."""
    stack = contextlib.ExitStack()
    stack.enter_context(fullsize_lock())
    try:
        config = SDConfig.sd15()
        model = build_random(config, seed=0)
        path = save_single_file(model, tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors")
    except BaseException:
        stack.close()
        raise
    full = _FullSize(model=model, path=path, config=config, stack=stack)
    del model
    _open_fullsize.append(full)
    yield full
    full.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Free the full-size model and release the lock after the last `fullsize` test of this run (after its
    own fixtures are torn down)."""
    yield
    if not _open_fullsize or item.get_closest_marker("fullsize") is None:
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if not any(it.get_closest_marker("fullsize") for it in later):
        _open_fullsize.pop().close()
