"""No host synchronisation inside the sampling loop (issue #14, GPU): on CUDA every Python-level read of a tensor's
value (bool / float / int / index / item / tolist / printing, nonzero, boolean-mask indexing, .cpu()) waits for
the GPU queue to drain. On the CPU the reads are free, so these tests count them instead: every read made from
the first UNet call of a sampling run to the sampler's return must be zero, for several samplers, with CFG, a
ControlNet with a step range, a prompt with a step range and a noise mask, and through the nodes' progress
callback (its per-step NaN guard keeps its promise without reading: see nodes/progress.FiniteGuard).

The Brownian-tree samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) are left out: torchsde's tree reads its
query times on the host by design (ComfyUI's does the same)."""
import contextlib

import pytest
import torch
from _parity_util import random_init_

from glass_diffusion.nodes import progress
from glass_diffusion.nodes.sampling import run_sampler
from glass_diffusion.nodes.types import GlassUNet
from glass_diffusion.sd_core import sampling, samplers
from glass_diffusion.sd_core.controlnet import ControlNet, ControlNetConfig, apply_control, check_image
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import SD1
from glass_diffusion.sd_core.sampling import SampleRequest
from glass_diffusion.sd_core.unet import UNetConfig, UNetModel

CFG = UNetConfig.tiny()
SAMPLERS = [n for n in samplers.SAMPLER_NAMES if n not in samplers.BROWNIAN_SAMPLERS]
READS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "item", "tolist", "cpu", "__repr__",
         "__format__", "nonzero")


class ReadCounter:
    """Counts Python-level reads of tensor values while armed; `where` keeps the first few call sites."""

    def __init__(self):
        self.armed, self.count, self.where = False, 0, []

    def note(self, name):
        if self.armed:
            self.count += 1
            if len(self.where) < 8:
                import traceback
                self.where.append(f"{name} at " + " <- ".join(
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-4:-1][::-1]))

    @contextlib.contextmanager
    def patched(self, monkeypatch):
        for name in READS:
            real = getattr(torch.Tensor, name)

            def wrapper(t, *a, _real=real, _name=name, **k):
                self.note(_name)
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)
        real_getitem, real_nonzero, real_where = torch.Tensor.__getitem__, torch.nonzero, torch.where

        def getitem(t, idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                self.note("boolean-mask indexing")
            return real_getitem(t, idx)

        def nonzero(*a, **k):
            self.note("torch.nonzero")
            return real_nonzero(*a, **k)

        def where(cond, *a, **k):
            if not a and not k:
                self.note("torch.where(cond)")
            return real_where(cond, *a, **k)
        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
        monkeypatch.setattr(torch, "nonzero", nonzero)
        monkeypatch.setattr(torch, "where", where)
        yield self
        self.armed = False


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = random_init_(UNetModel(CFG), 0).eval()
    model = DiffusionModel.build(unet, SD1)
    torch.manual_seed(1)
    net = random_init_(ControlNet(ControlNetConfig(CFG, hint_widths=(4, 8, 8, 16))), 1).eval()
    g = torch.Generator().manual_seed(5)
    pos = [[torch.randn(1, 77, CFG.context_dim, generator=g), {}],
           [torch.randn(1, 77, CFG.context_dim, generator=g), {"start_percent": 0.2, "end_percent": 0.7}]]
    neg = [[torch.randn(1, 77, CFG.context_dim, generator=g), {}]]
    image = check_image(torch.rand(1, 64, 64, 3, generator=g))
    shared = {}
    pos, neg = (apply_control(c, net, image, 0.8, 0.1, 0.9, shared) for c in (pos, neg))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g), "noise_mask": mask}
    return model, pos, neg, latent


def _request(name, steps=4):
    return SampleRequest(seed=3, steps=steps, cfg=6.0, sampler_name=name, scheduler="karras", denoise=0.9)


def _arm_at_first_unet_call(monkeypatch, counter):
    """Arm the counter when the sampler first calls its denoiser; the setup before the loop is not counted."""
    real = sampling.prepare

    def prepare(*a, **k):
        p = real(*a, **k)

        def denoiser(x, sigma):
            counter.armed = True
            return p.denoiser(x, sigma)
        return p._replace(denoiser=denoiser)
    monkeypatch.setattr(sampling, "prepare", prepare)

    real_get = samplers.get_sampler

    def get_sampler(name):
        fn = real_get(name)

        def run(*a, **k):
            try:
                return fn(*a, **k)
            finally:
                counter.armed = False  # the sampler returned: the loop is over
        return run
    monkeypatch.setattr(samplers, "get_sampler", get_sampler)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_loop_reads_no_tensor_value(parts, monkeypatch, name):
    model, pos, neg, latent = parts
    steps = []
    counter = ReadCounter()
    _arm_at_first_unet_call(monkeypatch, counter)
    with counter.patched(monkeypatch), torch.no_grad():
        out = sampling.sample(model, pos, neg, latent, _request(name),
                              callback=lambda i, x, d: steps.append(i))
    assert steps and torch.isfinite(out["samples"]).all()
    assert counter.count == 0, f"{name}: {counter.count} reads of tensor values in the loop: {counter.where}"


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_node_progress_callback_reads_no_tensor_value(parts, monkeypatch, name):
    """run_sampler's callback (progress bar, NaN guard, last x0) on top of the loop: still no read."""
    model, pos, neg, latent = parts
    monkeypatch.setattr(progress, "previews_enabled", lambda: False)
    counter = ReadCounter()
    _arm_at_first_unet_call(monkeypatch, counter)
    with counter.patched(monkeypatch):
        out, x0 = run_sampler("GlassKSampler", GlassUNet(model), pos, neg, latent, _request(name, steps=5))
    assert torch.isfinite(out["samples"]).all() and torch.isfinite(x0["samples"]).all()
    assert counter.count == 0, f"{name}: {counter.count} reads of tensor values in the loop: {counter.where}"


def test_the_counter_sees_a_read(parts, monkeypatch):
    """The test can fail: a callback that reads a value in the loop is counted."""
    model, pos, neg, latent = parts
    counter = ReadCounter()
    _arm_at_first_unet_call(monkeypatch, counter)
    with counter.patched(monkeypatch), torch.no_grad():
        sampling.sample(model, pos, neg, latent, _request("euler"), callback=lambda i, x, d: float(d.abs().max()))
    assert counter.count == 4


class _LaggingGuard(progress.FiniteGuard):
    """FiniteGuard on its CUDA path, emulated on the CPU: each flag's copy lands `lag` steps after it was queued."""

    def __init__(self, *a, lag=2):
        super().__init__(*a)
        self.lag, self.now, self.waited = lag, 0, False

    def _is_async(self, tensor):
        return True

    def _event(self):
        guard, due = self, self.now + self.lag

        class Event:
            def query(self):
                return guard.now >= due

            def synchronize(self):
                guard.waited = True
        return Event()

    def __call__(self, step, tensor):
        self.now = step
        super().__call__(step, tensor)


def test_the_guard_names_the_first_bad_step_when_it_notices_later():
    ok, bad = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), float("nan"))
    guard = _LaggingGuard("GlassKSampler", "the UNet's x0 estimate", 8)
    for step, t in enumerate([ok, ok, bad, bad]):
        guard(step, t)  # steps 0..3: the flag of step 2 lands at step 4
    with pytest.raises(progress.NonFiniteError, match="at step 3 of 8") as info:
        guard(4, bad)
    assert info.value.step == 2 and not guard.waited


def test_the_guard_waits_at_the_last_step_and_at_finish():
    ok, bad = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), float("inf"))
    guard = _LaggingGuard("GlassKSampler", "the UNet's x0 estimate", 3, lag=10)
    guard(0, ok)
    guard(1, bad)  # not landed yet: no error
    with pytest.raises(progress.NonFiniteError, match="at step 2 of 3"):
        guard(2, ok)  # the last step waits for every flag
    assert guard.waited
    guard = _LaggingGuard("GlassKSampler", "the UNet's x0 estimate", 5, lag=10)
    guard(0, ok)
    guard(1, bad)
    with pytest.raises(progress.NonFiniteError, match="at step 2 of 5"):
        guard.finish()  # a run that ends before its last planned step
    guard = _LaggingGuard("GlassKSampler", "the UNet's x0 estimate", 2, lag=10)
    guard(0, ok)
    guard(1, ok)
    guard.finish()  # all finite: nothing raised


def test_the_guard_on_the_cpu_raises_at_the_bad_step():
    guard = progress.FiniteGuard("GlassKSampler", "the UNet's x0 estimate", 4)
    guard(0, torch.zeros(2, 2))
    with pytest.raises(progress.NonFiniteError, match="at step 2 of 4"):
        guard(1, torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpm_2", "lms"])
def test_on_cuda_the_loop_never_synchronises(parts, monkeypatch, name):
    """The real thing on a GPU: from the end of the first step (the ControlNet's hint is cached then) to the
    sampler's return, any synchronising CUDA call raises (sync debug mode "error"), with the nodes' NaN guard
    and CPU step noise. The guard's own wait at the last step is left out (its one deliberate sync)."""
    model, pos, neg, latent = parts
    model = model.replace(unet=model.unet.cuda())
    for c in pos + neg:
        c[1]["glass_control"].net.cuda()
    guard = progress.FiniteGuard("GlassKSampler", "x0", 10 ** 6)  # never at its last step
    real_get = samplers.get_sampler

    def get_sampler(n):
        fn = real_get(n)

        def run(*a, **k):
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return run
    monkeypatch.setattr(samplers, "get_sampler", get_sampler)

    def callback(i, x, denoised):
        guard(i, denoised)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = sampling.sample(model, pos, neg, latent, _request(name), callback=callback)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        model.unet.cpu()
        for c in pos + neg:
            c[1]["glass_control"].net.cpu()
    guard.finish()
    assert torch.isfinite(out["samples"]).all()
