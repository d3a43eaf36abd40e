"""The graph error types shared by the workflow loader, the validator and the executor (no SD knowledge).

``GraphError`` is one problem, with the node / input / field it concerns; ``GraphValidationError`` carries
every problem of a graph (ComfyUI's node_errors style). Both are re-exported by nodes/validation.py and
nodes/executor.py, where callers have always found them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass
class GraphError:
    """One problem found in a graph; ``kind`` follows ComfyUI's error types where one exists."""
    kind: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    input_name: str | None = None

    def __str__(self) -> str:
        where = f"node {self.node_id} ({self.class_type})" if self.node_id is not None else "graph"
        if self.input_name:
            where += f" input '{self.input_name}'" if self.node_id is not None else f" field '{self.input_name}'"
        return f"{where}: {self.message}"


class GraphValidationError(ValueError):
    """The graph is invalid; ``errors`` lists every problem."""

    def __init__(self, errors: list[GraphError]):
        self.errors = list(errors)
        super().__init__("invalid workflow:\n" + "\n".join(f"  {e}" for e in self.errors))


def suggest(word, choices, limit: int = 40) -> str:
    """' (did you mean 'x'?)' for the closest choice, '' when none is close; choices are listed elsewhere."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    if not close:  # case-only differences and prefixes count too
        low = str(word).lower()
        close = [c for c in names if c.lower() == low] or [c for c in names if low and c.lower().startswith(low)]
    return f"; did you mean {close[0]!r}?" if close else ""


def listing(choices, limit: int = 40) -> str:
    """The choices written out ('a', 'b', ...), the first ``limit`` of a long list with the count."""
    items = [repr(str(c)) if not isinstance(c, str) else repr(c) for c in choices]
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"
    return ", ".join(items) if items else "(none)"
