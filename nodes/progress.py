"""Progress, cancellation and previews, the same calls inside ComfyUI and headless.

Node code calls ``ProgressBar(total).update_absolute(step, total, preview)`` and ``check_cancel()``.
Inside ComfyUI these go to ``comfy.utils.ProgressBar`` (the browser's bar and previews) and
``comfy.model_management.throw_exception_if_processing_interrupted`` (the Cancel button), imported
lazily. Headless they draw a tqdm bar, call an optional preview hook, and raise ``Interrupted`` once
``request_cancel()`` was called (the CLI calls it on the first Ctrl-C).

The cancel flag and the preview hook belong to a run, not to the process: both live in context variables.
``cancel_scope(event)`` makes a ``threading.Event`` the flag of the code inside it (the executor opens one per
run, reusing the caller's if there is one; the CLI's Ctrl-C handler sets the event it opened), so a cancel in
one run never stops another run in another thread. Outside any scope the calls use one process-wide flag.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections import deque
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

# Headless and not on a terminal (tqdm draws nothing there): one plain "desc: step i/n" line per step on stderr.
# Off for library callers; the CLI turns it on.
plain_lines: ContextVar[bool] = ContextVar("glass_diffusion_plain_progress", default=False)
PREVIEW_MAX_SIZE = 512
_process_cancel = threading.Event()  # the flag outside any cancel_scope
_cancel: ContextVar[threading.Event] = ContextVar("glass_cancel")
_preview_hook: ContextVar[Optional[Callable]] = ContextVar("glass_preview_hook", default=None)


class Interrupted(Exception):
    """The run was cancelled; raised between steps and between nodes."""


class NonFiniteError(ArithmeticError):
    """A model output holds NaN or infinity (the picture would be blank); names the node and the step."""

    def __init__(self, node: str, what: str, step: Optional[int] = None, total: Optional[int] = None):
        at = f" at step {step + 1} of {total}" if step is not None else ""
        super().__init__(f"{node}: {what}{at} is not finite (NaN or infinity), so the picture would be blank; "
                         "check the weights and the prompt weights (or run with --allow-nan to look at it)")
        self.node, self.what, self.step = node, what, step


def allow_nan() -> bool:
    """The runtime setting --allow-nan (headless only): let non-finite outputs through for debugging."""
    from .runtime import get_settings
    return bool(get_settings().allow_nan)


def check_finite(node: str, what: str, tensor, step: Optional[int] = None, total: Optional[int] = None) -> None:
    """Raise NonFiniteError when a float tensor holds NaN / inf (unless --allow-nan)."""
    if tensor is None or not getattr(tensor, "is_floating_point", lambda: False)() or allow_nan():
        return
    import torch
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(node, what, step, total)


class FiniteGuard:
    """check_finite for every step of a sampling run (issue #10: a NaN stops the run naming node and step) without
    a host synchronisation per step (issue #14: on CUDA, reading a flag waits for the GPU queue to drain).

    `guard(step, tensor)` queues on the tensor's device `isfinite(tensor).all()` and a copy of that flag into a
    host buffer (pinned memory, non_blocking, followed by a CUDA event), so nothing waits. Flags are read on the
    host once their copy has landed: on the CPU (and other devices, where the copy simply blocks) at once, so the
    bad step itself raises, exactly as check_finite did; on CUDA at the first later step whose event query (never
    waiting) finds the copy done, typically the next step or the one after, and at the latest at the last step or
    at `finish()`, which wait. Whichever step notices, the error names the first non-finite step; what is lost is
    the work of the one or two steps run on an image that is lost anyway. Reading every N steps instead would
    stall the queue once per N steps and still name the step only if every flag were kept, which this does."""

    def __init__(self, node: str, what: str, total: int):
        self.node, self.what, self.total = node, what, max(int(total), 1)
        self.enabled = not allow_nan()
        self._host = self._view = None  # host flags [total] (True until written) and their numpy view
        self._pending = deque()  # (step, event) of flags whose copy may not have landed
        self._read = 0  # flags [0, _read) have been read

    def _is_async(self, tensor) -> bool:
        return tensor.is_cuda

    def _event(self):
        import torch
        event = torch.cuda.Event()
        event.record()
        return event

    def __call__(self, step: int, tensor) -> None:
        if not self.enabled or tensor is None or not getattr(tensor, "is_floating_point", lambda: False)():
            return
        import torch
        step = min(int(step), self.total - 1)
        is_async = self._is_async(tensor)
        if self._host is None:
            self._host = torch.ones(self.total, dtype=torch.bool, pin_memory=bool(tensor.is_cuda))
            self._view = self._host.numpy()  # numpy reads never touch a device tensor
        self._host[step].copy_(torch.isfinite(tensor).all(), non_blocking=is_async)
        if is_async:
            self._pending.append((step, self._event()))
            self._collect(wait=step >= self.total - 1)
        else:
            self._scan(step)

    def finish(self) -> None:
        """Wait for the flags still in flight and raise for a non-finite step among them (after the loop)."""
        self._collect(wait=True)

    def _collect(self, wait: bool) -> None:
        landed = None
        while self._pending:
            step, event = self._pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                break
            self._pending.popleft()
            landed = step
        if landed is not None:
            self._scan(landed)

    def _scan(self, upto: int) -> None:
        start = self._read
        flags = self._view[start:upto + 1]
        self._read = max(start, upto + 1)
        if not flags.all():
            bad = start + int(flags.argmin())
            self._pending.clear()
            raise NonFiniteError(self.node, self.what, bad, self.total)


def in_comfyui() -> bool:
    """True when running inside a ComfyUI server (which always imports comfy.model_management)."""
    return "comfy.model_management" in sys.modules


def cancel_event() -> threading.Event:
    """The current run's cancel flag (the process-wide one outside any cancel_scope)."""
    return _cancel.get(_process_cancel)


def in_cancel_scope() -> bool:
    return _cancel.get(None) is not None


@contextlib.contextmanager
def cancel_scope(event: Optional[threading.Event] = None) -> Iterator[threading.Event]:
    """Run the block with ``event`` (a new one by default) as its cancel flag; yields the event."""
    event = threading.Event() if event is None else event
    token = _cancel.set(event)
    try:
        yield event
    finally:
        _cancel.reset(token)


def request_cancel() -> None:
    cancel_event().set()


def clear_cancel() -> None:
    cancel_event().clear()


def cancel_requested() -> bool:
    return cancel_event().is_set()


def check_cancel() -> None:
    """Raise if cancellation was requested (ComfyUI's interrupt exception inside ComfyUI)."""
    if in_comfyui():
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
    if cancel_event().is_set():
        raise Interrupted("cancelled")


def set_preview_hook(hook: Callable | None) -> None:
    """Headless: ``hook(image: PIL.Image, value, total)`` receives every preview of runs in this context
    (this thread); None to stop."""
    _preview_hook.set(hook)


def previews_enabled() -> bool:
    """Whether anyone shows previews (ComfyUI, or a headless hook): skip decoding them otherwise."""
    return in_comfyui() or _preview_hook.get() is not None


class ProgressBar:
    """``update(n)`` / ``update_absolute(value, total=None, preview=None)``; preview: a PIL image."""

    def __init__(self, total: int, desc: str | None = None):
        self.total, self.current = total, 0
        self._comfy = self._tqdm = None
        if in_comfyui():
            import comfy.utils
            self._comfy = comfy.utils.ProgressBar(total)
        else:
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, desc=desc, leave=False, disable=None)
            self._lines = (desc or "progress") if plain_lines.get() and self._tqdm.disable else None

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        check_cancel()
        if total is not None:
            self.total = total
        value = min(value, self.total)
        if self._comfy is not None:
            packed = ("JPEG", preview, PREVIEW_MAX_SIZE) if preview is not None else None
            self._comfy.update_absolute(value, self.total, packed)
        else:
            self._tqdm.total = self.total
            self._tqdm.update(value - self.current)
            if self._lines is not None and value > self.current:
                print(f"{self._lines}: step {value}/{self.total}", file=sys.stderr, flush=True)
            hook = _preview_hook.get()
            if preview is not None and hook is not None:
                hook(preview, value, self.total)
        self.current = value
        if self._tqdm is not None and value >= self.total:
            self.close()

    def update(self, n: int = 1) -> None:
        self.update_absolute(self.current + n)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
