"""The one way amdet-gate reads an input file and writes an output file (docs/supply-chain.md).

Reading (`read_capped`, `read_capped_text`, `open_regular`, `read_regular_at`): every input --
policy, AMDET_POLICY, `policy validate`, `--prompts`, `report RESULT`, config.json, the shard
index, tokenizer files, the lock and its signature, cache entries, images embedded in a report --
is opened without blocking (a FIFO must not hang the gate), checked to be a regular file after
it is opened (a FIFO, /dev/zero, a socket or a folder is refused: /dev/zero's size reads as 0
and would never end) and read to at most its limit plus one byte (a file that grows while read
is still caught). `inside`: the file must resolve inside that folder (a symlinked config or
tokenizer file cannot pull in a file from elsewhere on the machine, unless the caller was told
to follow symlinks). Every refusal is one line in the caller's error class, so it carries the
exit code the caller documents (a policy: 4, a model file: 2).

Writing (`write_atomic`): a temporary file in the target's folder, then a rename over the
target, so a reader (or a crash, or a full disk) never sees a half-written report; an existing
symlink at the target is replaced, never written through. A failure is `OutputError`, exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from amdet_gate.errors import GateError, OutputError
from amdet_gate.sanitise import one_line

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
KIB, MIB = 1024, 1024 * 1024


class FileRefused(Exception):
    """The low-level refusal (`read_regular_at`), for callers that word their own message."""


class NotRegular(FileRefused):
    """A symlink (when not followed), FIFO, device, socket or folder where a file was expected."""


class TooLarge(FileRefused):
    """More bytes than the limit."""


class OutsideFolder(FileRefused):
    """The path resolves outside the folder it must stay in."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB else f"{limit // KIB} KiB" if limit >= KIB else f"{limit} bytes"


def resolve_inside(path: Path, folder: Path) -> Path:
    """`path` with every symlink resolved; OutsideFolder if that is not inside `folder` (also resolved)."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real != root and not real.is_relative_to(root):
        raise OutsideFolder(f"it resolves to {real}, outside {root}")
    return real


def _open_fd(path: Path | str, dir_fd: int | None, nofollow: bool) -> int:
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | _BINARY | (_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd) if dir_fd is not None else os.open(path, flags)
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise NotRegular("a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode  # after opening: what was opened is what is checked
        if not stat.S_ISREG(mode):
            raise NotRegular(_kind(mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(fd: int, limit: int) -> bytes:
    chunks, left = [], limit + 1  # one byte more than allowed tells "too large" apart
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) > limit:
        raise TooLarge(f"larger than {_size(limit)}")
    return data


def read_regular_at(dir_fd: int | None, name: str | Path, limit: int, *, nofollow: bool = True) -> bytes:
    """At most `limit` bytes of the regular file `name` (relative to `dir_fd` when given).

    Raises NotRegular, TooLarge or OSError: for callers that word their own message (the cache).
    """
    fd = _open_fd(name, dir_fd, nofollow)
    try:
        return _read_fd(fd, limit)
    finally:
        os.close(fd)


def read_capped(path: Path, limit: int, what: str, error: type[GateError], *, inside: Path | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit`; anything else is one `error` line.

    `what` names the file in the message ("policy", "prompt file", "config.json", ...).
    """
    shown = f"{what} {one_line(path)}"
    try:
        target = resolve_inside(path, inside) if inside is not None else path
        return read_regular_at(None, target, limit, nofollow=False)
    except OutsideFolder as exc:
        raise error(f"{shown}: {exc}; refused (pass --follow-symlinks to allow it)") from None
    except NotRegular as exc:
        raise error(f"{shown} is {exc}, not a regular file; refused") from None
    except TooLarge as exc:
        raise error(f"{shown} is {exc}; refused") from None
    except OSError as exc:
        raise error(f"cannot read {shown}: {exc.strerror or type(exc).__name__}") from None


def read_capped_text(path: Path, limit: int, what: str, error: type[GateError], *,
                     inside: Path | None = None) -> str:
    """`read_capped` decoded as UTF-8 (anything else is one `error` line)."""
    data = read_capped(path, limit, what, error, inside=inside)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {one_line(path)} is not UTF-8 text") from None


@contextlib.contextmanager
def open_regular(path: Path, what: str, error: type[GateError], *, inside: Path | None = None) -> Iterator[BinaryIO]:
    """A regular file opened for streaming (weights: too large to cap in memory), same refusals as read_capped."""
    shown = f"{what} {one_line(path)}"
    try:
        target = resolve_inside(path, inside) if inside is not None else path
        fd = _open_fd(target, None, nofollow=False)
    except OutsideFolder as exc:
        raise error(f"{shown}: {exc}; refused (pass --follow-symlinks to allow it)") from None
    except NotRegular as exc:
        raise error(f"{shown} is {exc}, not a regular file; refused") from None
    except OSError as exc:
        raise error(f"cannot read {shown}: {exc.strerror or type(exc).__name__}") from None
    with os.fdopen(fd, "rb") as fh:
        yield fh


def append_regular(path: Path, data: bytes) -> None:
    """Append to a regular file (created if absent): the job summary, which other steps share.

    Opened without blocking and checked after opening, like every input: a FIFO with no reader
    or a device is refused (OutputError), never waited on or written into.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK | _CLOEXEC | _BINARY, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot append to {one_line(path)}: {exc.strerror or type(exc).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OutputError(f"cannot append to {one_line(path)}: it is {_kind(mode)}, not a regular file")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 24]):]
    except OSError as exc:
        raise OutputError(f"cannot append to {one_line(path)}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)


def refuse_special(path: Path, label: str) -> None:
    """An output path that exists must be a regular file or a symlink: never a folder, a FIFO or a
    device (renaming a report over /dev/null, as root, would replace the device)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or a parent that is no folder: the write itself says so)
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"{label} {one_line(path)} is {_kind(mode)}; an output must be a file")


def write_atomic(path: Path, data: bytes, *, mode: int | None = None, durable: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename; OutputError (exit 2) on failure.

    mode: the file's permissions (default: as a new file under the umask). durable: fsync before
    the rename (the lock file: a deployment gate reads it later, it must survive a crash).
    """
    path = Path(path)
    refuse_special(path, "output")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Our own exclusive create (not mkstemp's 0600): a new file gets 0666 less the umask, as open() would.
        tmp = path.parent / f".{path.name[:80]}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o666)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[: 1 << 24]):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if not path.parent.is_dir():
            why = f"{one_line(path.parent)} is not a folder"
        raise OutputError(f"cannot write {one_line(path)}: {why}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
