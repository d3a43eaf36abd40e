"""Classifier-free guidance over a UNet and CONDITIONING lists, combined as ComfyUI combines them.

CONDITIONING = [[context [1|B, 77k, D], {"pooled_output": ..., optional "strength", "area", "mask",
"mask_strength", "set_area_to_bounds", "start_percent", "end_percent"}], ...].

For one step, every active entry of the positive and negative lists runs through the UNet (entries whose inputs
have the same shape share one batched call, so plain cond + uncond is one batch-2 call); each output is weighted
by strength x mask x area (feathered area edges) and the weighted sums are normalised per pixel. Then
x0 = uncond + cfg * (cond - uncond); with cfg == 1 the negative list is skipped. A handle with `rescale_cfg`
> 0 applies RescaleCFG to that combination (`rescale_cfg` below).
"""
import math

import torch
import torch.nn.functional as F

from .controlnet import CONTROL_KEY, ControlRunner
from .errors import ParamError
from .samplers import sigma_value

_WIDTH_HINTS = {2048: "an SDXL conditioning", 1024: "an SD 2.x conditioning", 768: "an SD 1.x conditioning"}


def check_conditioning(cond, model, name="conditioning"):
    """Refuse a CONDITIONING that is malformed or whose width does not fit the model (e.g. SDXL's 2048 into
    SD 1.x's 768). model: a DiffusionModel. Raises ParamError(name)."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0:
        raise ParamError(name, f"{name} must be a non-empty CONDITIONING list of [tensor, dict] pairs")
    context_dim = model.context_dim
    for i, entry in enumerate(cond):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not torch.is_tensor(entry[0]):
            raise ParamError(name, f"{name}[{i}] must be a [tensor, dict] pair")
        t = entry[0]
        if t.ndim != 3:
            raise ParamError(name, f"{name}[{i}] tensor must be [B, tokens, width], got shape {tuple(t.shape)}")
        if t.shape[-1] != context_dim:
            guess = _WIDTH_HINTS.get(t.shape[-1])
            hint = f" ({guess}? this is an {model.family.label} model)" if guess else ""
            raise ParamError(name, f"{name}[{i}] has width {t.shape[-1]} but the model's cross-attention expects "
                                   f"{context_dim}{hint}")
        if not torch.isfinite(t).all():
            raise ParamError(name, f"{name}[{i}] contains NaN or infinite values")
        s = entry[1].get("strength", 1.0)
        if not math.isfinite(float(s)):
            raise ParamError(name, f"{name}[{i}] strength must be finite, got {s!r}")


def check_cfg(cfg) -> float:
    try:
        value = float(cfg)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ParamError("cfg", f"cfg must be a finite number >= 0, got {cfg!r}")
    return value


def rescale_cfg(x, sigma, cond, uncond, cfg, multiplier):
    """RescaleCFG (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16) on
    x0 estimates: cond and uncond go to v space, are combined with cfg, the result is rescaled to the std of
    the cond (over C, H, W) and blended with the plain combination by `multiplier`, then turned back into x0."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    root = (s * s + 1.0) ** 0.5
    x_in = x / (s * s + 1.0)  # the sigma_data = 1 skip term of the v parameterisation
    v_cond = (x_in - cond) * root / s  # x0 -> v: x0 = x_in - v * s / root
    v_uncond = (x_in - uncond) * root / s
    v_cfg = v_uncond + cfg * (v_cond - v_uncond)
    ratio = v_cond.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    v_final = multiplier * (v_cfg * ratio) + (1.0 - multiplier) * v_cfg
    return x_in - v_final * s / root


def prepare_conds(cond, latent_shape, model_sampling, device):
    """CONDITIONING -> list of dicts with the area resolved to latent cells (h, w, y, x), the mask resized to
    the latent, and start/end percents turned into sigma bounds."""
    h, w = latent_shape[2], latent_shape[3]
    out = []
    for context, opts in cond:
        c = {"context": context.to(device), "strength": float(opts.get("strength", 1.0))}
        area = opts.get("area")
        if area is not None:
            if area[0] == "percentage":
                a = area[1:]
                area = (max(1, round(a[0] * h)), max(1, round(a[1] * w)), round(a[2] * h), round(a[3] * w))
            c["area"] = tuple(int(v) for v in area)
        if opts.get("mask") is not None:
            mask = opts["mask"].to(device=device, dtype=torch.float32)
            mask = mask.unsqueeze(0) if mask.ndim == 2 else mask  # (Bm, H, W)
            if tuple(mask.shape[1:]) != (h, w):
                mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear").squeeze(1)
            if opts.get("set_area_to_bounds", False):
                bounds = mask.abs().amax(dim=0)
                if bounds.max() == 0:
                    c["area"] = (8, 8, 0, 0)
                else:
                    ys, xs = torch.where(bounds != 0)
                    y0, x0 = int(ys.min()), int(xs.min())
                    c["area"] = (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)
            c["mask"] = mask
            c["mask_strength"] = float(opts.get("mask_strength", 1.0))
        # step ranges, kept only where they can exclude a step (0% and 100% cannot), so a step reads the sigma's
        # value (a host sync on a GPU when the sampler did not pass it along) only for entries that need it
        if "start_percent" in opts and float(opts["start_percent"]) > 0.0:
            c["sigma_start"] = model_sampling.percent_to_sigma(float(opts["start_percent"]))
        if "end_percent" in opts and float(opts["end_percent"]) < 1.0:
            c["sigma_end"] = model_sampling.percent_to_sigma(float(opts["end_percent"]))
        if opts.get(CONTROL_KEY) is not None:
            c["control"] = opts[CONTROL_KEY]  # a controlnet.ControlApplication chain
        out.append(c)
    return out


def pair_areas(conds_a, conds_b):
    """ComfyUI gives every area entry of one list a partner with the same area in the other list (using the
    context of the smallest entry there that contains it), so guidance compares like with like."""
    def inside(a, b):
        return a[2] >= b[2] and a[3] >= b[3] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]

    for src, dst in ((conds_a, conds_b), (conds_b, conds_a)):
        for c in list(src):
            if "area" not in c:
                continue
            smallest = None
            for d in dst:
                if "area" in d:
                    if inside(c["area"], d["area"]) and (
                            smallest is None or "area" not in smallest
                            or math.prod(smallest["area"][:2]) > math.prod(d["area"][:2])):
                        smallest = d
                elif smallest is None:
                    smallest = d
            if smallest is None or smallest.get("area") == c["area"]:
                continue
            dst.append({**c, "context": smallest["context"]})


def _area_and_mult(c, x, sigma):
    """(input_x, mult, area) for one entry at this step, or None when sigma is outside its range."""
    if "sigma_start" in c or "sigma_end" in c:
        s = sigma_value(sigma)
        if "sigma_start" in c and s > c["sigma_start"]:
            return None
        if "sigma_end" in c and s < c["sigma_end"]:
            return None
    area = None
    inp = x
    if "area" in c:
        ah, aw, ay, ax = c["area"]
        ah, aw = min(x.shape[2] - ay, ah), min(x.shape[3] - ax, aw)
        area = (ah, aw, ay, ax)
        inp = x[:, :, ay:ay + ah, ax:ax + aw]
    if "mask" in c:
        m = _batch(c["mask"], inp.shape[0])  # masks cycle over the batch, as prepare_mask does: (B, H, W)
        if area is not None:
            m = m[:, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
        m = (m * c["mask_strength"]).unsqueeze(1)  # (B, 1, h, w)
        mult = m.repeat(1, inp.shape[1], 1, 1).to(x.dtype)
    else:
        mult = torch.ones_like(inp)
    mult = mult * c["strength"]
    if "mask" not in c and area is not None:  # feather the area's inner edges over up to 8 cells
        for dim, (size, off, full) in enumerate(((area[0], area[2], x.shape[2]), (area[1], area[3], x.shape[3]))):
            rr = min(8, mult.shape[2 + dim] // 4)
            for t in range(rr):
                f = (t + 1) / rr
                if off != 0:
                    mult.narrow(2 + dim, t, 1).mul_(f)
                if size + off < full:
                    mult.narrow(2 + dim, size - 1 - t, 1).mul_(f)
    return inp, mult, area


def _cat_contexts(contexts):
    """Concatenate contexts of different token counts by repeating each to their least common multiple (repeating
    keys and values leaves attention unchanged)."""
    n = 1
    for c in contexts:
        n = math.lcm(n, c.shape[1])
    return torch.cat([c.repeat(1, n // c.shape[1], 1) for c in contexts])


def _batch(t, b):
    if t.shape[0] == b:
        return t
    if t.shape[0] > b:
        return t[:b]
    return t.repeat((math.ceil(b / t.shape[0]),) + (1,) * (t.ndim - 1))[:b]


class CFGDenoiser:
    """denoiser(x, sigma[B]) -> x0 with classifier-free guidance over a DiffusionModel handle.

    concat: optional [B, Cc, h, w] extra input channels (9-channel inpainting models: mask + masked latent).
    """

    def __init__(self, model, positive, negative, cfg, latent_shape, concat=None):
        self.model = model
        self.cfg = check_cfg(cfg)
        check_conditioning(positive, model, "positive")
        if negative is not None:
            check_conditioning(negative, model, "negative")
        device = model.device
        self.positive = prepare_conds(positive, latent_shape, model.sampling, device)
        self.negative = prepare_conds(negative, latent_shape, model.sampling, device) if negative is not None else []
        pair_areas(self.positive, self.negative)
        # one runner per distinct ControlNet chain; refuses a bad control image batch before any step
        self.controls = {id(c["control"]): ControlRunner(c["control"], model.sampling, latent_shape[0],
                                                         model.context_dim)
                         for c in self.positive + self.negative if "control" in c}
        self.concat = concat
        self.unet_dtype = model.dtype  # looked up once, not on every step
        self.calls = 0  # UNet forward calls (for tests and statistics)

    def _run(self, x_in, sigma, context, concat, control=None, n=1, level=None):
        """level: the step's own sigma batch (it carries the sampler's host value of the noise level)."""
        self.calls += 1
        if control is None:
            return self.model.denoise(x_in, sigma, context, concat, dtype=self.unet_dtype)
        # the ControlNet sees what the UNet sees: the scaled input (no inpainting concat), timestep and context
        ms = self.model.sampling
        residuals = self.controls[id(control)](ms.calculate_input(sigma, x_in), sigma if level is None else level,
                                               ms.timestep(sigma).to(x_in.device, torch.float32), context, n)
        extra = {} if residuals is None else {"control": residuals}
        return self.model.denoise(x_in, sigma, context, concat, dtype=self.unet_dtype, **extra)

    def calc_cond_batch(self, cond_lists, x, sigma):
        """Weighted x0 estimates, one per list (None lists give zeros)."""
        B = x.shape[0]
        outs = [torch.zeros_like(x) for _ in cond_lists]
        counts = [torch.full_like(x, 1e-37) for _ in cond_lists]
        jobs = []  # (list index, input_x, mult, area, context, concat, control)
        for li, conds in enumerate(cond_lists):
            for c in conds or []:
                r = _area_and_mult(c, x, sigma)
                if r is None:
                    continue
                inp, mult, area = r
                concat = None
                if self.concat is not None:
                    concat = _batch(self.concat, B)
                    if area is not None:
                        concat = concat[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
                jobs.append((li, inp, mult, area, _batch(c["context"], B), concat, c.get("control")))
        while jobs:  # one UNet call per group of same-shaped inputs with the same ControlNet chain
            shape, control = jobs[0][1].shape, jobs[0][6]
            group = [j for j in jobs if j[1].shape == shape and j[6] is control]
            jobs = [j for j in jobs if not (j[1].shape == shape and j[6] is control)]
            x_in = torch.cat([j[1] for j in group])
            ctx = _cat_contexts([j[4] for j in group])
            concat = torch.cat([j[5] for j in group]) if self.concat is not None else None
            out = self._run(x_in, sigma.repeat(len(group)), ctx, concat, control, len(group),
                            sigma).chunk(len(group))
            for (li, _, mult, area, _, _, _), o in zip(group, out):
                if area is None:
                    outs[li] += o * mult
                    counts[li] += mult
                else:
                    ah, aw, ay, ax = area
                    outs[li][:, :, ay:ay + ah, ax:ax + aw] += o * mult
                    counts[li][:, :, ay:ay + ah, ax:ax + aw] += mult
        return [o / n for o, n in zip(outs, counts)]

    @torch.no_grad()
    def __call__(self, x, sigma):
        skip_uncond = math.isclose(self.cfg, 1.0)
        cond, uncond = self.calc_cond_batch([self.positive, None if skip_uncond else self.negative], x, sigma)
        if skip_uncond:
            return cond
        if self.model.rescale_cfg:
            return rescale_cfg(x, sigma, cond, uncond, self.cfg, self.model.rescale_cfg)
        return uncond + (cond - uncond) * self.cfg
