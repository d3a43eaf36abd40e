"""Output files written all or nothing: a failed or cancelled run leaves no file, a save never overwrites.

Design. A headless run (nodes/executor.py) opens an ``OutputTransaction`` and makes it current (a context
variable) while its nodes run; save nodes find it with ``current()``.

- ``stage``: the node writes each file to a hidden temp file ``.glass-*<suffix>.tmp`` in the final folder
  (same file system, so the final name is one hard link away) and the transaction picks its final name
  ``<base>_<NNNNN>_<suffix>`` (ComfyUI's numbering) at once: the first number >= the node's start
  (1 + the largest on disk, computed by the node) and past every number this transaction reserved for the
  same base, whose name does not exist yet. The node reports that name in its ui result, as usual.
- ``commit`` (the executor calls it when every node succeeded and no cancel was requested): each temp file
  gets its final name with ``os.link``, which never replaces an existing file. If another process took the
  name since staging, the next free number is used and the ui dict the node returned (the same object) is
  updated in place. Then the temp files are removed.
- ``rollback`` (any failure, ``Interrupted``, a second Ctrl-C, or an error during ``commit``): the temp files
  and every final name this commit already linked are removed, so the output folder is as before the run.
  A process killed outright (SIGKILL, power loss) can leave ``.glass-*.tmp`` files, never a numbered file.
- Stale temp files: a temp file's name carries its writer, ``.glass-<host>-<pid>-*.tmp``. The first stage into
  a folder in a transaction removes the ones whose writer is gone: this host's, of a process that no longer
  exists; another host's (a shared folder) or an older unnamed one, once a day old. A live writer's temp file
  is never touched.

Without a current transaction (inside ComfyUI, whose own executor runs the nodes, or a node called
directly) the save node opens its own ``transaction()`` for the call: its files appear when it returns,
all of them or none.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

__all__ = ["OutputTransaction", "current", "transaction", "file_name"]

_current: ContextVar[Optional["OutputTransaction"]] = ContextVar("glass_output_transaction", default=None)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\.glass-(?:([0-9a-f]{8})-(\d+)-)?.*\.tmp$")
STALE_AFTER_S = 24 * 3600  # a temp file whose writer cannot be checked is stale after a day


def file_name(base: str, number: int, suffix: str = ".png") -> str:
    """ComfyUI's numbered name: ``Glass_00001_.png``."""
    return f"{base}_{number:05}_{suffix}"


def link_no_replace(src: str, dst: str) -> None:
    """Give a finished temp file a second name; FileExistsError rather than replace an existing file."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: exclusive create, then replace our own empty file
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        os.replace(src, dst)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a number we cannot ask about): keep its file
    return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the ``.glass-*.tmp`` files in folder whose writer is gone (see the module notes); their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        host, pid = m.group(1), m.group(2)
        if host == _HOST and pid is not None:
            stale = int(pid) != os.getpid() and not _process_exists(int(pid))
        else:
            try:
                stale = now - os.lstat(path).st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale and os.path.isfile(path) and not os.path.islink(path):
            _unlink(path)
            removed.append(name)
    return removed


@dataclass
class _Staged:
    tmp: str
    folder: Path
    base: str
    suffix: str
    number: int
    result: dict  # the node's ui entry; "filename" follows the final name


class OutputTransaction:
    """Files staged by the nodes of one run; ``commit`` names them all, ``rollback`` removes them all."""

    def __init__(self):
        self.state = "open"  # "open" | "committed" | "rolled back"
        self._staged: list[_Staged] = []
        self._reserved: dict[tuple, int] = {}  # (folder, base, suffix) -> largest number reserved
        self._swept: set[str] = set()  # folders whose stale temp files were removed

    def __len__(self) -> int:
        return len(self._staged)

    def __bool__(self) -> bool:  # an empty transaction is still a transaction
        return True

    def _free_number(self, folder: Path, base: str, suffix: str, start: int) -> int:
        key = (str(folder), base, suffix)
        n = max(start, self._reserved.get(key, 0) + 1)
        while os.path.lexists(folder / file_name(base, n, suffix)):
            n += 1
        self._reserved[key] = n
        return n

    def stage(self, folder: Path, base: str, start: int, write: Callable[[BinaryIO], None],
              result: dict, suffix: str = ".png") -> int:
        """Write a file (``write(f)``) to a temp file in folder, reserve ``<base>_<N>_<suffix>`` with N >= start,
        set ``result["filename"]`` to that name; returns N. The file appears at ``commit``."""
        if self.state != "open":
            raise RuntimeError(f"output transaction already {self.state}")
        folder = Path(folder)
        if str(folder) not in self._swept:
            self._swept.add(str(folder))
            remove_stale_temps(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".glass-{_HOST}-{os.getpid()}-", suffix=suffix + ".tmp", dir=folder)
        try:
            os.chmod(tmp, _NEW_FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask-based mode
            with os.fdopen(fd, "wb") as f:
                write(f)
        except BaseException:
            _unlink(tmp)
            raise
        n = self._free_number(folder, base, suffix, start)
        result["filename"] = file_name(base, n, suffix)
        self._staged.append(_Staged(tmp, folder, base, suffix, n, result))
        return n

    def commit(self) -> list[Path]:
        """Give every staged file its final name (never replacing a file); returns the final paths."""
        if self.state != "open":
            raise RuntimeError(f"output transaction already {self.state}")
        placed: list[Path] = []
        try:
            for s in self._staged:
                while True:
                    final = s.folder / file_name(s.base, s.number, s.suffix)
                    try:
                        link_no_replace(s.tmp, str(final))
                        break
                    except FileExistsError:  # taken by someone else since staging
                        s.number = self._free_number(s.folder, s.base, s.suffix, s.number + 1)
                placed.append(final)
                s.result["filename"] = final.name
        except BaseException:
            for p in placed:
                _unlink(p)
            self.rollback()
            raise
        self._remove_temps()
        self.state = "committed"
        return placed

    def rollback(self) -> None:
        """Remove every staged temp file (nothing was named yet, or commit removed its names)."""
        if self.state == "committed":
            return
        self._remove_temps()
        self.state = "rolled back"

    def _remove_temps(self) -> None:
        for s in self._staged:
            _unlink(s.tmp)


def current() -> Optional[OutputTransaction]:
    """The run's transaction, or None (inside ComfyUI, or a node called outside a run)."""
    return _current.get()


@contextlib.contextmanager
def transaction() -> Iterator[OutputTransaction]:
    """Open a transaction and make it current; commit when the block ends normally, else roll back."""
    txn = OutputTransaction()
    token = _current.set(txn)
    try:
        try:
            yield txn
        finally:
            _current.reset(token)
    except BaseException:
        txn.rollback()
        raise
    txn.commit()


def _read_umask() -> int:
    """The process umask, read once at import: from /proc where it is shown (no change at all), else by
    setting and restoring it once, while this module is imported (never while a file is being saved)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_read_umask()  # the mode open() gives a new file


def _new_file_mode() -> int:
    """The mode open() would give a new file: 0666 minus the process umask (as read at import)."""
    return _NEW_FILE_MODE
