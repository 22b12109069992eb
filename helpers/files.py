"""Writing files safely: atomic replacement, a writability probe, JSON of plain values."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file in the same folder, flush, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def unwritable_reason(folder: Path) -> str | None:
    """None when files can be created in `folder` (made if missing), else the system's reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


_SKIP = object()


def jsonable(obj):
    """obj with everything JSON cannot hold (tensors, optimizer state, ...) left out."""
    if isinstance(obj, dict):
        out = {str(k): jsonable(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(obj, (list, tuple)):
        return [x for x in (jsonable(v) for v in obj) if x is not _SKIP]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return _SKIP
