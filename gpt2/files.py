"""Files that are never seen half-written: write to a temporary name, then rename.

Shared by the token shards (gpt2/shards.py) and the checkpoints (gpt2/checkpoint.py). A writer killed
mid-write (even by kill -9) leaves only its temporary file, `.<name>.tmp.<pid>`; the next run in that
folder removes the ones whose process is gone (remove_stale_tmp_files).
"""
import os
import pathlib


def tmp_path(path: pathlib.Path) -> pathlib.Path:
    # the pid keeps concurrent writers (every rank calling ensure_shakespeare) off each other's files;
    # the leading dot and the suffix keep every reader's glob (*.npy, ckpt_*.pt) off it
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def write_atomic(path, write) -> None:
    """Call write(f) on a temporary file, flush it to disk, then rename it to path."""
    path = pathlib.Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp_files(folder, pattern: str = ".*.tmp*") -> list:
    """Delete the temporary files in folder (matching pattern) whose writer process no longer exists;
    returns their names. Both `.x.tmp.<pid>` and the older `.x.tmp<pid>` are recognized."""
    removed = []
    for tmp in pathlib.Path(folder).glob(pattern):
        pid = tmp.name.rsplit(".tmp", 1)[-1].lstrip(".")
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
