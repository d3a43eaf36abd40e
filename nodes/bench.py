"""``glass-diffusion bench``: Glass against diffusers and ComfyUI, on the same weights and settings, same run.

Every engine runs in its own worker process (nodes/bench_worker.py) that loads the checkpoint once; the driver
then asks each worker in turn for one measurement, rotating the order every repeat, so that the noise of a busy
machine falls on all engines alike (interleaved repeats). Measured per engine: model load (once), end-to-end
text-to-image (prompt encoding, sampling, VAE decode), one guided UNet step (the UNet on a batch of 2 x B),
one VAE decode, and the process's peak memory (RSS; on CUDA also the allocator peak). The first call of each
measurement is a warm-up and is not counted; the figures are medians. It prints ratios against the first
Glass variant and writes JSON; it asserts nothing.

Without --checkpoint the weights are random with the full SD 1.5 shapes (same FLOPs as a real checkpoint),
written once to a cache folder as fp16 single-file safetensors. ComfyUI is used as a library from a checkout
(--comfyui DIR) with the Python that has its requirements (--comfyui-python). diffusers is used when it is
importable (pip install diffusers transformers).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("t2i", "unet_step", "vae_decode")
DTYPES = ("fp32", "fp16", "bf16")
WORKER = Path(__file__).with_name("bench_worker.py")


def default_checkpoint(cache: Path) -> Path:
    """The random full-size SD 1.5 checkpoint of seed 0, written once (atomically) into `cache`."""
    path = cache / "random_sd15_seed0.safetensors"
    if not path.is_file():
        import torch

        from ..sd_core.checkpoint import save_checkpoint
        from ..sd_core.model import SDConfig
        from ..sd_core.random_weights import build_random
        cache.mkdir(parents=True, exist_ok=True)
        print(f"writing random full-size SD 1.5 weights to {path} (once) ...", file=sys.stderr, flush=True)
        save_checkpoint(build_random(SDConfig.sd15(), seed=0), path, dtype=torch.float16)
    return path


class EngineError(RuntimeError):
    """An engine's worker process ended before answering (its own error message is on stderr above)."""


class Worker:
    """One engine's process and its JSON-lines channel."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None, cwd: str | None = None):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=cwd, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise EngineError(f"bench engine {self.name!r} exited (code {self.proc.wait()}); its output is above")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def _engine_commands(a, checkpoint: Path) -> list[tuple[str, list[str], dict | None, str | None]]:
    common = ["--checkpoint", str(checkpoint), "--device", a.device, "--dtype", a.dtype, "--res", str(a.res),
              "--steps", str(a.steps), "--sampler", a.sampler, "--threads", str(a.threads)]
    pkg = __package__  # glass_diffusion.nodes (or the ComfyUI folder name of the pack)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = []
    for variant, dtype in a.glass:
        label = variant if dtype == a.dtype else f"{variant},{dtype}"
        out.append((f"glass[{label}]", [sys.executable, "-m", f"{pkg}.bench_worker", "--engine", "glass",
                                        "--speed", variant, *common, "--dtype", dtype], env, None))
    if "diffusers" in a.engines:
        out.append(("diffusers", [sys.executable, "-m", f"{pkg}.bench_worker", "--engine", "diffusers", *common],
                    env, None))
    if "comfyui" in a.engines:
        py = a.comfyui_python or sys.executable
        out.append(("comfyui", [py, str(WORKER), "--engine", "comfyui", "--comfyui", a.comfyui, *common], None,
                    a.comfyui))
    return out


def run(a) -> dict:
    checkpoint = Path(a.checkpoint) if a.checkpoint else default_checkpoint(Path(a.cache))
    workers = []
    try:
        for name, cmd, env, cwd in _engine_commands(a, checkpoint):
            print(f"loading {name} ...", file=sys.stderr, flush=True)
            workers.append(Worker(name, cmd, env, cwd))
        results = {w.name: {"info": w.info, **{f"{op}@{b}": [] for op in a.ops for b in a.batch}} for w in workers}
        for rep in range(a.repeats + 1):  # repeat 0 is the warm-up
            for op in a.ops:
                for b in a.batch:
                    order = workers[rep % len(workers):] + workers[:rep % len(workers)]
                    for w in order:
                        reply = w.ask(op=op, batch=b)
                        if "error" in reply:
                            raise RuntimeError(f"{w.name} {op} batch {b}: {reply['error']}")
                        if rep:
                            results[w.name][f"{op}@{b}"].append(reply)
            print(f"repeat {rep}/{a.repeats} done", file=sys.stderr, flush=True)
        for w in workers:
            results[w.name]["memory"] = w.ask(op="stats")
    finally:
        for w in workers:
            w.close()
    return {"settings": {k: v for k, v in vars(a).items() if k not in ("func",)}, "checkpoint": str(checkpoint),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device_name": _device_name(a.device),
            "engines": results}


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU x{os.cpu_count()}"


def report(res: dict) -> str:
    engines = res["engines"]
    names = list(engines)
    base = names[0]
    s = res["settings"]
    lines = [f"{res['device_name']}, {s['dtype']}, {s['res']} px, {s['steps']} steps {s['sampler']}, cfg 7.5, "
             f"median of {s['repeats']} interleaved repeats ({res['date']})"]
    head = f"{'measure':<18}" + "".join(f"{n:>24}" for n in names)
    lines += [head, "-" * len(head)]
    lines.append(f"{'load s':<18}" + "".join(f"{engines[n]['info']['load_seconds']:>24.2f}" for n in names))
    keys = [k for k in engines[base] if "@" in k]
    for key in keys:
        med = {n: statistics.median(r["seconds"] for r in engines[n][key]) for n in names}
        cells = "".join(f"{med[n]:>12.3f}s {med[n] / med[base]:>6.2f}x{'' if _finite(engines[n][key]) else '!'}   "
                        .rjust(24) for n in names)
        lines.append(f"{key.replace('@', ' batch '):<18}{cells}")
    lines.append(f"{'peak RSS GiB':<18}" + "".join(f"{engines[n]['memory']['peak_rss_bytes'] / 2**30:>24.2f}"
                                                 for n in names))
    if any(engines[n]["memory"].get("cuda_peak_bytes") for n in names):
        lines.append(f"{'CUDA peak GiB':<18}" + "".join(
            f"{(engines[n]['memory']['cuda_peak_bytes'] or 0) / 2**30:>24.2f}" for n in names))
    lines.append(f"(time relative to {base}: below 1 is faster than it; '!' marks non-finite output)")
    return "\n".join(lines)


def _finite(replies) -> bool:
    return all(r.get("finite", True) for r in replies)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time Glass against diffusers and ComfyUI (same weights, same run)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="an SD 1.x .safetensors (default: random full-size SD 1.5 weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="UNet / text encoder precision for every engine (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--res", type=int, default=None, help="image side (default 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 on cuda, 10 on cpu)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8 on cuda, 1 on cpu)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats per engine after one warm-up")
    p.add_argument("--glass", default="default", help="Glass speed variants to time, ';'-separated, each a "
                   "comma list of sd_core.speed options ('none', 'channels_last', 'compile[=MODE]'; 'default' is "
                   "what the loader uses on this device) and optionally a precision (fp32, fp16, bf16) for that "
                   "variant alone, e.g. 'none;channels_last;channels_last,bf16' (default: %(default)s)")
    p.add_argument("--engines", default=None, help="comma list among diffusers,comfyui (default: diffusers when "
                   "importable, comfyui when --comfyui is given)")
    p.add_argument("--comfyui", metavar="DIR", help="a ComfyUI checkout to time as a library")
    p.add_argument("--comfyui-python", metavar="PY", help="the Python with ComfyUI's requirements")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list among {','.join(OPS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads per engine (default: torch's own)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "glass-bench"),
                   help="where the random checkpoint is kept (default %(default)s)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")


def main(a) -> int:
    import torch

    from ..sd_core.speed import SpeedOptions
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = a.device.startswith("cuda")
    a.dtype = a.dtype or ("fp16" if gpu else "fp32")
    a.res = a.res or (512 if gpu else 256)
    a.steps = a.steps or (20 if gpu else 10)
    a.batch = [int(b) for b in (a.batch or ("1,8" if gpu else "1")).split(",")]
    a.ops = [op for op in a.ops.split(",") if op]
    if bad := [op for op in a.ops if op not in OPS]:
        raise ValueError(f"--ops: unknown {bad}; choose from {OPS}")
    variants = []
    for v in a.glass.split(";"):
        words = [w.strip() for w in v.split(",") if w.strip()]
        dtypes = [w for w in words if w in DTYPES] or [a.dtype]  # a precision word times Glass in that dtype
        words = [w for w in words if w not in DTYPES]
        label = "default" if words in ([], ["default"]) else SpeedOptions.parse(",".join(words)).label()
        variants.append((label, dtypes[-1]))  # "default" is resolved by the worker, which knows the model
    a.glass = variants
    if a.engines is None:
        a.engines = (["diffusers"] if importlib.util.find_spec("diffusers") else []) + (["comfyui"] if a.comfyui else [])
    else:
        a.engines = [e for e in a.engines.split(",") if e]
    if "comfyui" in a.engines and not a.comfyui:
        raise ValueError("--engines comfyui needs --comfyui DIR (a ComfyUI checkout) and usually --comfyui-python")
    try:
        res = run(a)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.json}")
    return 0
