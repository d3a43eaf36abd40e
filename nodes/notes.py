"""Notes: what a node did that its inputs did not say in so many words (a size rounded down to a multiple of 8,
prompt words the model does not know, an inpainting mask with nothing in it). Not errors: the run goes on.

They go to the ``glass_diffusion`` logger at WARNING level: ComfyUI's console inside ComfyUI; headless the CLI
prints them as ``note: ...`` on stderr (``print_to_stderr``), and with no logging set up at all Python's
last-resort handler prints them on stderr too. So a note is never silent.
"""
from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("glass_diffusion")


def note(node: str, input_name: str | None, message: str) -> None:
    """Report something a node did on its own, naming the node and the input it is about."""
    where = f"{node}: input {input_name!r}: " if input_name else f"{node}: "
    LOGGER.warning("%s%s", where, message)


class _StderrNotes(logging.Handler):
    """``note: <message>`` on the current sys.stderr (looked up per record, so redirected streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr, flush=True)


def print_to_stderr() -> None:
    """Show the notes as ``note: ...`` lines on stderr (the CLI does this once)."""
    if not any(isinstance(h, _StderrNotes) for h in LOGGER.handlers):
        LOGGER.addHandler(_StderrNotes(logging.WARNING))
