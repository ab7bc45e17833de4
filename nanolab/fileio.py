"""Atomic writes: every file or folder nanolab writes appears whole under its name, or not at all.

    with atomic_path("out/model.h5") as tmp:     # a unique temporary name beside the target
        write_something(tmp)                     # a file or a folder
    atomic_write("out/state.json", text)         # str or bytes

On success the temporary file is fsynced and renamed over the target (an existing folder is swapped out and then
removed); on any error it is deleted and the target is untouched. A full disk surfaces as OSError(ENOSPC) naming
the target, not the temporary name.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (so a rename inside it is durable); folders may refuse on some OSes."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same folder, so the rename is atomic; the suffix is kept, so tools
    that pick a format by extension still work); rename it to `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temporary {tmp} for {path}")
        if tmp.is_dir():
            for p in tmp.rglob("*"):
                if p.is_file():
                    fsync_path(p)
            if path.is_dir():  # swap: the old folder aside, the new one in, the old one removed
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            fsync_path(tmp)
            os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path
