"""Writing files safely: atomic replacement, a writability probe, JSON of plain values, a lock
that keeps one run per folder, and telling a full disk apart. Floor "ground": imports nothing of the package."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None


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


def lock_folder(folder: Path):
    """(open lock file, None) while this process holds the exclusive lock on `folder` (its file
    .lock, which records our pid), or (None, pid text of the holder) when another process holds it.
    The lock lasts while the file stays open; the operating system drops it when the process ends,
    however it ends (SIGKILL included), so nothing stale is left. Without fcntl (Windows): no lock."""
    if fcntl is None:
        return None, None
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised while handling) is the system's 'No space left on
    device': torch.save reports it as a RuntimeError ('unexpected pos') raised over the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False
