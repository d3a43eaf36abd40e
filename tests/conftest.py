"""Shared fixtures. The full-size SD 1.5 model (random seeded weights, ~4.3 GB fp32) and its single-file
checkpoint are built once per test run, under the machine-wide full-size lock, and released (memory, file
and lock) right after the last test marked `fullsize`, not at the end of the session. The full-size SD 2.x
model (~5.2 GB) likewise; the tests using it run after every other full-size test, and building it first
releases the SD 1.5 one, so the two are never in memory together."""
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helper modules (_parity_util, ...)

from _parity_util import build_random, fullsize_lock, save_single_file  # noqa: E402

from glass_diffusion.sd_core.family import SD2_V  # noqa: E402
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


@pytest.fixture(scope="session")
def sd2_full(tmp_path_factory):
    """A single-file checkpoint in the real layout of full-size SD 2.x with seeded random weights (fp32, 5.2 GB).
    Only the file is kept (`model` is None): tests read the parts they need from it, so a full-size reference
    network and ours share one copy of the weights. Tests using it must carry the `fullsize` marker; they run
    last."""
    while _open_fullsize:  # every SD 1.5 full-size test has run (pytest_collection_modifyitems)
        _open_fullsize.pop().close()
    stack = contextlib.ExitStack()
    stack.enter_context(fullsize_lock())
    try:
        config = SDConfig.sd2()
        path = save_single_file(build_random(config, seed=0, family=SD2_V),
                                tmp_path_factory.mktemp("sd2") / "sd2_random.safetensors")
    except BaseException:
        stack.close()
        raise
    full = _FullSize(model=None, path=path, config=config, stack=stack)
    _open_fullsize.append(full)
    yield full
    full.close()


def pytest_collection_modifyitems(session, config, items):
    """Tests using the full-size SD 2.x model run after all others (stable order otherwise)."""
    items.sort(key=lambda item: "sd2_full" in getattr(item, "fixturenames", ()))


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
