"""The one rule for every directory mbridge writes (``convert import``/``export``,
``save_hf_pretrained``, the demo): ``atomic_dir``.

- An existing target is refused unless the caller says ``overwrite`` (the CLI's
  ``--overwrite``, the API's ``overwrite=True``; ``OutputExists`` names whichever it is).
- A target never overlaps an input: equal to it, inside it or above it is refused before
  anything is written, so replacing the target cannot delete an input. Nor may it be the
  current directory or one above it (``--out .``, ``--out ..``).
- The output is written into a hidden sibling ``.{name}.partial-{host}-{pid}-{k}`` and
  renamed into place when complete; on an error or a signal that unwinds it is removed. A
  run killed outright (SIGKILL) leaves it behind: the next run into the same target removes
  such leftovers of dead processes of this host.
- Directories are created with the permissions of the user's umask (``tempfile.mkdtemp``
  would make them 0700, unreadable by a cluster's other users and jobs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

API_FLAG = "overwrite=True"


class OutputError(ValueError):
    """The output target cannot be written as asked (overlaps an input, is the current
    directory, ...); nothing was written."""


class OutputExists(FileExistsError):
    """The target exists and ``overwrite`` was not given. ``message(flag)`` says how to
    replace it in the caller's terms (``--overwrite`` in the CLI)."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(self.message(API_FLAG))

    def message(self, flag: str) -> str:
        return f"{self.path} already exists; pass {flag} to replace it or choose another"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the hidden partial outputs (and replaced old copies) of ``target`` that
    processes of this host left behind when they were killed; returns what was removed.
    Leftovers of live processes and of other hosts (shared filesystems) are left alone."""
    removed = []
    if not target.parent.is_dir():
        return removed
    host = _host()
    for kind in (".partial-", ".old-"):
        prefix = f".{target.name}{kind}"
        for path in target.parent.glob(f"{prefix}*"):
            fields = path.name[len(prefix):].split("-")
            if len(fields) < 2 or fields[0] != host or not fields[1].isdigit():
                continue
            if not _pid_alive(int(fields[1])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def check_output(target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False) -> Path:
    """``target`` as an absolute path, checked against the rule (see the module docstring);
    OutputError or OutputExists otherwise."""
    target = Path(os.path.abspath(target))
    cwd = Path.cwd().resolve()
    real = target.resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"output {target} is the current directory or one above it; "
                          "choose a new directory")
    for src in inputs:
        if src is None:
            continue
        src = Path(src).resolve()
        if real == src or src in real.parents or real in src.parents:
            raise OutputError(f"output {target} overlaps input {src}; choose a separate "
                              "directory")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExists(target)
    return target


def _why_write_failed(path: Path, error: Exception) -> str:
    """What stopped a write, in words: torch.save reports a full disk or a reached file size
    limit as a RuntimeError about stream positions, so look at the disk and the limit."""
    import resource

    with contextlib.suppress(OSError):
        fs = os.statvfs(path.parent)
        if fs.f_bavail * fs.f_frsize < 2**20:
            return "the disk is full"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"the file size limit is reached (ulimit -f: {soft} bytes)"
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn any failure to write ``path`` (a full disk, a file size limit, an I/O error) into
    one OSError naming the file and the reason."""
    path = Path(path)
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise OSError(f"cannot write {path}: {_why_write_failed(path, e)}") from None


def _make_partial(target: Path) -> Path:
    prefix = f"{_partial_prefix(target)}{_host()}-{os.getpid()}-"
    for k in range(1000):
        tmp = target.parent / f"{prefix}{k}"
        try:
            tmp.mkdir()  # mode 0777 less the umask
            return tmp
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary directory beside {target}")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
               overwrite: bool = False) -> Iterator[Path]:
    """Yield a new hidden directory beside ``target`` to write into; on success it is renamed
    to ``target`` (replacing it, if ``overwrite``), on any error it is removed. ``inputs``:
    the directories the output is made from (never overlapped)."""
    final = check_output(target, inputs=inputs, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = _make_partial(final)
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{_host()}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
