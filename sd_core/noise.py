"""Random sources for sampling, all explicit and seeded.

- `prepare_noise`: the starting noise exactly as ComfyUI draws it (CPU generator, so the same on every machine;
  with `batch_index` every latent takes the noise at its index of one sequential draw).
- Step noise for ancestral / SDE samplers: a callable `noise(sigma, sigma_next) -> Tensor` shaped like x.
  * "cpu" (our default): drawn from a CPU generator seeded with seed + 1 and moved to x's device, so the image
    does not depend on the device. On a CPU it is exactly ComfyUI's default noise sampler.
  * "device": a generator on x's device seeded with seed (seed + 1 on a CPU), ComfyUI's behaviour on a GPU.
  * Brownian tree (SDE samplers): torchsde.BrownianTree over [sigma_min, sigma_max] seeded with seed, as ComfyUI;
    kind "cpu" builds the tree on the CPU (ComfyUI's dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde), "device" on x's
    device (ComfyUI's *_gpu variants).
"""
import warnings

import numpy as np
import torch

NOISE_KINDS = ("cpu", "device")


def prepare_noise(latent, seed, batch_index=None):
    """Initial noise for `latent` [B, C, h, w]: torch.manual_seed(seed) then randn on the CPU."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    shape = tuple(latent.shape)
    if batch_index is None:
        return torch.randn(shape, dtype=latent.dtype, generator=gen, device="cpu")
    unique, inverse = np.unique(np.asarray(batch_index), return_inverse=True)
    draws = {}
    for i in range(int(unique[-1]) + 1):  # draw one latent at a time up to the largest index
        n = torch.randn((1,) + shape[1:], dtype=latent.dtype, generator=gen, device="cpu")
        if i in unique:
            draws[i] = n
    return torch.cat([draws[int(unique[j])] for j in np.ravel(inverse)], dim=0)


class CPUNoise:
    """Step noise from a seeded CPU generator, moved to x's device: device-independent."""

    def __init__(self, x, seed):
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed((int(seed) + 1) % 2 ** 64)

    def __call__(self, sigma=None, sigma_next=None):
        # to CUDA through pinned memory without waiting: a plain copy from pageable memory synchronises the stream
        # on every step (issue #14); the values are the same
        pin = self.device.type == "cuda"
        n = torch.randn(self.shape, dtype=self.dtype, generator=self.generator, device="cpu", pin_memory=pin)
        return n.to(self.device, non_blocking=pin)


class DeviceNoise:
    """Step noise from a generator on x's device (ComfyUI's default_noise_sampler)."""

    def __init__(self, x, seed):
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.generator = torch.Generator(device=x.device)
        self.generator.manual_seed((int(seed) + (1 if x.device.type == "cpu" else 0)) % 2 ** 64)

    def __call__(self, sigma=None, sigma_next=None):
        return torch.randn(self.shape, dtype=self.dtype, generator=self.generator, device=self.device)


class BrownianTreeNoise:
    """Normalised Brownian increments W(sigma_next) - W(sigma) / sqrt(|sigma_next - sigma|) from torchsde.

    Queries for the same interval always return the same noise, whatever the order of the queries."""

    def __init__(self, x, sigma_min, sigma_max, seed, cpu=True):
        import torchsde  # runtime dependency (ComfyUI ships it)

        self.cpu, self.device, self.dtype = cpu, x.device, x.dtype
        t0, t1 = torch.as_tensor(sigma_min).detach(), torch.as_tensor(sigma_max).detach()
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros_like(x)
        if cpu:
            t0, t1, w0 = t0.cpu(), t1.cpu(), w0.cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=int(seed))

    def __call__(self, sigma, sigma_next):
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1.0
        if a > b:
            a, b, sign = b, a, -1.0
        if self.cpu:
            a, b = a.detach().cpu().float(), b.detach().cpu().float()
        with warnings.catch_warnings():  # torchsde warns when a float32 query rounds a hair past the end point
            warnings.filterwarnings("ignore", message="Should have")
            w = self.tree(a, b)
        w = w.to(device=self.device, dtype=self.dtype) * sign
        return w / (b - a).abs().sqrt().to(device=self.device, dtype=self.dtype)


def make_noise_source(kind, x, seed, sigmas=None, brownian=False):
    """A step-noise source for x. brownian=True needs the schedule `sigmas` (tree over its positive range)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if brownian:
        pos = sigmas[sigmas > 0]
        if len(pos) == 0:
            return None
        return BrownianTreeNoise(x, pos.min(), sigmas.max(), seed, cpu=(kind == "cpu"))
    return CPUNoise(x, seed) if kind == "cpu" else DeviceNoise(x, seed)
