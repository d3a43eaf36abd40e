"""The two error classes sd_core raises for bad input.

`ParamError`: a call argument is invalid; `.param` names it (`steps`, `latent`, `positive`, ...), so a node can
report the input it came from (nodes/checks.py maps it to NodeInputError, keeping the class).
`CheckpointError`: a file that cannot be loaded; names the file (`.path`) and the offending keys (`.keys`).
Both are ValueErrors.
"""
from typing import Iterable


class ParamError(ValueError):
    """An invalid argument; `.param` is its name."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)  # the message names the parameter in words


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; names the file and the offending keys (`.keys`)."""

    def __init__(self, path, message: str, keys: Iterable[str] = ()):
        self.path, self.keys = str(path), list(keys)
        super().__init__(f"{path}: {message}")
