"""Atomic output directories and small JSON helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _finite(obj: Any) -> Any:
    """NaN/inf → None, so files are strict JSON (null) that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if marker is not None:
            write_json(tmp / MARKER, marker)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous result back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
