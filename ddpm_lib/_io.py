"""Atomic file writes: a reader sees the old file or the new one, never a part.

Used by the checkpoints, the run folder's config and log, and the digits classifier's cache.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, os.replace).

    Raises:
        OSError: when writing fails (a full disk, say); the previous file at ``path`` is left as
            it was.
    """
    return write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never a part.

    Raises:
        OSError: one line naming ``path`` and the cause; the previous file is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        # torch.save turns the OSError of a full disk into "RuntimeError: [enforce fail at
        # inline_container.cc] unexpected pos": the OSError is still its context.
        cause = e if isinstance(e, OSError) else _os_error_behind(e)
        if cause is not None:
            reason = cause.strerror or str(cause)
            error = OSError(
                cause.errno, f"writing {path} failed ({reason}); the previous file is untouched"
            )
            error.reason = reason  # for callers that say more about what is intact
            raise error from None
        raise
    _fsync_folder(path.parent)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` with ``write_atomically``."""
    return write_atomically(path, lambda f: f.write(text.encode()))


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that caused ``error`` (through its __cause__/__context__ chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
