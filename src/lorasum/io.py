"""Atomic output directories and small JSON helpers."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorasum.errors import LorasumError

MARKER = "lorasum.json"  # written in every output directory: what produced it, and its key


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Fault injection for the crash tests (tests/test_faults.py): with LORASUM_FAULT_AT=<glob>,
# the process SIGKILLs itself just before it renames a finished temp file/dir whose final name
# matches the glob (``GLOB:N``: at the N-th such rename). Unset (always, outside tests): no-op.
FAULT_ENV = "LORASUM_FAULT_AT"
_fault_hits = 0


def fault_point(name: str) -> None:
    """Die like a killed process here if LORASUM_FAULT_AT names this output (tests only)."""
    global _fault_hits
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition(":")
    if fnmatch.fnmatchcase(name, pattern):
        _fault_hits += 1
        if _fault_hits >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _temp_prefix(name: str) -> str:
    """Temp names carry the writer's pid, so a later run can remove what a killed one left."""
    return f".{name}.{os.getpid()}."


# what follows ".{name}." in a temp's name: "{pid}.{random}.tmp" / "…png", or "old-{pid}"
_STALE = re.compile(r"^(?:(?P<pid>\d+)\.[a-z0-9_]+\.(?:tmp|png)|old-(?P<old>\d+))$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> None:
    """Remove temp files/dirs beside ``out`` that a killed lorasum process left behind.

    Only names ``.{out.name}.{pid}.{random}{suffix}`` (our temps) and ``.{out.name}.old-{pid}``
    whose process is gone are touched; a live writer's temps are kept. An ``old-`` directory
    (killed between moving the previous result aside and renaming the new one in) is put back
    when ``out`` is missing, so a finished result is never lost.
    """
    parent = out.parent
    if not parent.is_dir():
        return
    head = f".{out.name}."
    for entry in parent.iterdir():
        if not entry.name.startswith(head):
            continue
        m = _STALE.match(entry.name[len(head) :])
        if m is None:
            continue
        pid = int(m.group("pid") or m.group("old"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if m.group("old") and not out.exists():
                os.replace(entry, out)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            pass  # someone else cleaned it up, or it is not ours to remove


# Errors of the file system, not of lorasum: reported as one line that says what to do.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_error(e: BaseException, out: Path) -> BaseException:
    """A full disk or a read-only/forbidden place → LorasumError; anything else unchanged."""
    full = isinstance(e, Exception) and ("No space left" in str(e) or "StorageFull" in str(e))
    if full or (isinstance(e, OSError) and e.errno in _WRITE_ERRNOS):
        why = getattr(e, "strerror", None) or str(e)[:80]
        return LorasumError(
            f"cannot write {out} ({why}); nothing was written: free disk space or choose a "
            "writable --out"
        )
    return e


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p ``path``'s parent; return the directories it created, deepest first."""
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty: what a failed write created."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def temp_beside(path: Path, suffix: str = ".tmp") -> str:
    """A new empty temp file beside ``path`` (for writers that need a file name), after
    removing what killed runs left there; finish it with ``commit_temp``."""
    try:
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=suffix)
    except OSError as e:
        raise write_error(e, path) from None
    os.close(fd)
    return tmp


def commit_temp(tmp: str, path: Path) -> None:
    """Rename a finished temp file onto ``path`` (atomic)."""
    fault_point(path.name)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file + rename)."""
    path = Path(path)
    created: list[Path] = []
    try:
        created = _make_parents(path)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    except OSError as e:
        remove_empty_dirs(created)
        raise write_error(e, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        fault_point(path.name)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        remove_empty_dirs(created)
        err = write_error(e, path)
        if err is e:
            raise
        raise err from None


def _finite(obj: Any) -> Any:
    """NaN/inf → None, so files are strict JSON (null) that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dumps_strict(obj: Any) -> str:
    """Strict JSON text (NaN/inf → null), as every file and `--json` output of lorasum."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON atomically (temp file + rename)."""
    atomic_write_text(path, dumps_strict(obj) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (a resolved config)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def existing_key(out: Path) -> str | None:
    """The key recorded in a finished output directory, or None if there is none."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        return read_json(marker).get("key")
    except (OSError, ValueError):
        return None


def check_output_dir(out: str | Path, key: str | None = None, overwrite: bool = False) -> bool:
    """Decide what to do with an output directory before doing any work.

    Returns True when ``out`` already holds the finished result with the same ``key`` (reuse it).
    Raises ``LorasumError`` when it holds something else, unless ``overwrite`` — which only ever
    replaces an empty directory or one that lorasum wrote (it has a ``lorasum.json``).
    """
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise LorasumError(f"output path {out} exists and is a file; choose another --out")
    if key is not None and existing_key(out) == key and not overwrite:
        return True
    if not any(out.iterdir()):
        return False
    if not (out / MARKER).is_file():
        raise LorasumError(
            f"output directory {out} holds files that lorasum did not write; "
            "choose a new or empty --out (--overwrite only replaces lorasum outputs)"
        )
    if overwrite:
        return False
    raise LorasumError(
        f"output directory {out} already holds a different result; "
        "choose a new --out or pass --overwrite"
    )


@contextlib.contextmanager
def atomic_dir(out: str | Path, marker: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; on success rename it to ``out``.

    On any exception the temp directory is removed and ``out`` is left as it was.
    ``marker`` (if given) is written as ``lorasum.json`` inside, last, so a directory with
    a marker is always complete.
    """
    out = Path(out)
    created: list[Path] = []
    try:
        created = _make_parents(out)
        remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out.name), suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    except OSError as e:
        remove_empty_dirs(created)
        raise write_error(e, out) from None
    try:
        yield tmp
        if marker is not None:
            write_json(tmp / MARKER, marker)
        fault_point(out.name)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            fault_point(out.name + ".swap")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous result back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(created)
        err = write_error(e, out)
        if err is e:
            raise
        raise err from None


ALLOW_PICKLE_ENV = "LORASUM_ALLOW_PICKLE"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def pickle_allowed(explicit: bool | None = None) -> bool:
    """May pickle checkpoints be loaded (always through ``torch.load(weights_only=True)``)?"""
    return _env_flag(ALLOW_PICKLE_ENV) if explicit is None else explicit


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
