"""Writing files so that a reader sees the old state or the new one, never half of either.

Every output the project writes goes through here: a file is written to a temp name in the same
directory and renamed over the target (`os.replace` is atomic on one filesystem); a directory is
built under a temp name and renamed into place. Failures become one-line UserErrors naming the path
(disk full, read-only, permission), and the temp name is removed, so nothing half-written stays.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Callable

from finetune.errors import UserError, first_line

FILE_MODE = 0o644  # outputs are plain user files, whatever umask-free temp files would get


def describe_os_error(err: OSError) -> str:
    """A short reason a user can act on."""
    if err.errno == errno.ENOSPC:
        return "the disk is full; free some space"
    if err.errno == errno.EDQUOT:
        return "the disk quota is exceeded; free some space"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a directory you can write to"
    if err.errno == errno.EROFS:
        return "the filesystem is read-only; choose another directory"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    return err.strerror or type(err).__name__


class WriteError(UserError):
    """A write that failed for a reason outside the program (disk full, permissions)."""

    def __init__(self, path: str, err: BaseException):
        self.path, self.os_error = path, err
        reason = describe_os_error(err) if isinstance(err, OSError) else first_line(err)
        super().__init__(f"could not write {path}: {reason}")


def write_bytes(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise WriteError(path, err) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def write_with(path: str, save: Callable[[str], None]) -> None:
    """Write `path` with a library's own save function (torch.save, safetensors, mx.save_safetensors), given a temp
    name beside it, then rename it into place. Those raise RuntimeError or their own errors, not OSError, when the
    disk fills: any error from `save` becomes a WriteError naming `path`, and the temp file is removed."""
    base = os.path.basename(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{base}.tmp{os.path.splitext(base)[1]}")
    try:
        save(tmp)  # the suffix is kept: mx.save_safetensors appends one otherwise
        move_into(tmp, path)
    except UserError:
        raise
    except Exception as err:
        raise WriteError(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def move_into(tmp: str, path: str) -> None:
    """A finished temp file (same filesystem) becomes `path` at once, with a user file's mode."""
    try:
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(path, err) from None


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data) -> None:
    """Strict JSON: a NaN or infinite number (a diverged loss) is written as null, which every reader accepts."""
    write_text(path, json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n")


def finite(value):
    """`value` with every non-finite float replaced by None, at any depth."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def build_dir(final: str, build: Callable[[str], None]) -> str:
    """Create directory `final` by calling build(tmp_dir) and renaming tmp_dir into place.

    The rename is atomic: a reader never sees a half-built directory. If another process built it first
    (the rename finds a non-empty target), theirs is kept and ours discarded. Any failure removes the
    temp directory; an OSError becomes a WriteError naming `final`."""
    parent = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    except OSError as err:
        raise WriteError(parent, err) from None
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes owner-only directories; outputs and caches are shared
        try:
            os.rename(tmp, final)
        except OSError as err:
            if not (os.path.isdir(final) and os.listdir(final)):
                raise WriteError(final, err) from None
    except OSError as err:
        raise WriteError(final, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_writable_dir(path: str, what: str) -> None:
    """Create `path` (and parents) or raise a one-line error naming it and `what` it is for."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as err:
        raise UserError(f"{what}={path} cannot be used: {describe_os_error(err)}") from None


def check_regular_file(path: str, label: str, max_bytes: int | None = None) -> int:
    """`label` names the file in messages (e.g. "DATASET=x.jsonl"). The size of `path` when it is a readable regular file (links followed) of at most `max_bytes`; otherwise a
    one-line error saying what it is instead. Reading a FIFO or /dev/zero would hang or never end."""
    import stat

    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{label}: a symbolic link that points back to itself (a loop)") from None
        if err.errno == errno.ENOENT and os.path.islink(path):
            raise UserError(f"{label}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        if err.errno == errno.ENOENT:
            raise UserError(f"{label}: file not found") from None
        raise UserError(f"{label} cannot be read: {describe_os_error(err)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{label}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else \
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
        raise UserError(f"{label}: is {kind}; give a regular file")
    if path.startswith("/proc/") or path.startswith("/sys/"):  # sizes there are 0 or fictional
        raise UserError(f"{label}: is a kernel file, not a data file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{label}: {info.st_size / 2**20:,.1f} MB, more than the {max_bytes / 2**20:,.0f} MB such a "
                        "file can be here; split it, or load a large dataset by its Hub id (streamed by `datasets`)")
    if not os.access(path, os.R_OK):
        raise UserError(f"{label} cannot be read: permission denied")
    return info.st_size
