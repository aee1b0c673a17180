"""One study, one writer: an OS lock on a file inside the study directory.

`study_lock(out, wait)` holds `filelock.FileLock` on ``out/.lorasum.lock`` for a whole run of
`reproduce`. The lock file lives in the study directory itself, so runs on other nodes that
share the storage (Ray) see it too. The kernel releases an flock when its holder dies, so a
lock left by a killed run (SIGKILL, OOM) is taken over by the next run without any clean-up.
After acquiring, the holder writes who it is (pid, host, start time, command line) to
``out/.lorasum.lock.json``, which a refused run names in its one-line error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from lorasum.errors import LorasumError
from lorasum.io import read_json, remove_empty_dirs, write_error, write_json

log = logging.getLogger(__name__)

LOCK_NAME = ".lorasum.lock"
HOLDER_NAME = ".lorasum.lock.json"


def is_lock_file(name: str) -> bool:
    """The lock, its holder file and the holder file's temps: not part of the study."""
    return name.startswith(LOCK_NAME)


def holder_info(argv: list[str] | None = None) -> dict:
    """Who holds the lock: this process (pid, host, start time in UTC, command line)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(sys.argv if argv is None else argv),
    }


def describe_holder(holder: dict | None) -> str:
    """'pid 1234 on host h since 2026-12-07 08:01:02 UTC', or 'another process' if unknown."""
    if not holder or "pid" not in holder:
        return "another process (it has not said who it is yet)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def read_holder(out: Path) -> dict | None:
    try:
        holder = read_json(out / HOLDER_NAME)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _unwritable(e: OSError, out: Path) -> BaseException:
    err = write_error(e, out)
    return err if err is not e else LorasumError(f"cannot write {out} ({e}); choose another --out")


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p ``out``; the directories it created, deepest first."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty_dirs(missing)
        raise _unwritable(e, out) from None
    return missing


def _acquire(out: Path, wait: bool) -> FileLock:
    lock = FileLock(out / LOCK_NAME, thread_local=False)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        holder = describe_holder(read_holder(out))
        if not wait:
            raise LorasumError(
                f"{out} is being run by {holder}; wait for it with --wait, or choose another --out"
            ) from None
        log.warning("%s is being run by %s; waiting for it to finish", out, holder)
        lock.acquire()
    except OSError as e:  # after Timeout, which is one
        raise _unwritable(e, out / LOCK_NAME) from None
    return lock


@dataclass
class HeldLock:
    """A held study lock: the study directory, the directories taking the lock created and
    whether it created the lock file."""

    out: Path
    created: list[Path]
    made_lock_file: bool

    def discard_created(self) -> None:
        """Undo what taking the lock made, when the run fails before the study started: the
        directories it created (if they hold nothing but the lock files), else the lock file
        it created in a directory that was there."""
        if self.out in self.created and all(is_lock_file(p.name) for p in self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)
            remove_empty_dirs(self.created[1:])
        elif self.made_lock_file:
            with contextlib.suppress(OSError):
                (self.out / LOCK_NAME).unlink()


@contextlib.contextmanager
def study_lock(out: str | Path, wait: bool = False) -> Iterator[HeldLock]:
    """Hold the study directory's lock for the body.

    Another holder: raise a `LorasumError` naming it at once, or (``wait``) log one line and
    wait for it. The directory (and its parents) is created if missing; the yielded
    `HeldLock.discard_created` removes them again if the run stops before the study started.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorasumError(f"output path {out} is a file; choose another --out")
    while True:
        created = _make_dirs(out)
        made_lock_file = not (out / LOCK_NAME).exists()
        try:
            lock = _acquire(out, wait)
        except BaseException:
            remove_empty_dirs(created)
            raise
        if (out / LOCK_NAME).exists():
            break
        # the run we waited for failed before its study started and removed what it had made
        lock.release()
    held = HeldLock(out, created, made_lock_file)
    try:
        try:
            write_json(out / HOLDER_NAME, holder_info())
        except BaseException:
            held.discard_created()
            raise
        yield held
    finally:
        with contextlib.suppress(OSError):
            (out / HOLDER_NAME).unlink()
        lock.release()
