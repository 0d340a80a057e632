"""Files the daemon writes itself (trust anchor state, its own key), whole or not at all.

Why: a router loses power without warning, and flash file systems (jffs2, ubifs) may
keep a file half-written. A reader must find the old content or the new, never a part:
the data goes to a temporary file in the same directory, is synced, and is renamed over
the target (or linked to it, when an existing file must never be replaced).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, atomically.

    The file never exists with other permissions, not even for a moment (a key must not
    be readable while it is written). ``exclusive``: raise FileExistsError rather than
    replace a file that is there (or that appeared meanwhile). Missing parent directories
    are made (0755 before the umask). OSError otherwise, with nothing left behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(target)  # made 0600
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            _link_new(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _sync_dir(target.parent)


def _new_file(target: Path) -> tuple[int, str]:
    """A new file of ours (0600, never an existing one, never through a symlink) next to
    ``target``, as ``tempfile.mkstemp`` makes it: tempfile is not imported for this, as
    with the shutil, bz2 and lzma it imports it costs the daemon ~1 MB of RSS for its
    whole life (docs/footprint.md)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{os.urandom(6).hex()}")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _link_new(tmp: str, target: Path) -> None:
    """``tmp`` becomes ``target`` only if ``target`` does not exist (no clobbering)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        # a file system without hard links (vfat): check, then rename
        if target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(tmp, target)


def _sync_dir(directory: Path) -> None:
    """The rename itself reaches the disk (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
