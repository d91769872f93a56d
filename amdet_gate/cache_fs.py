"""The verdict cache's file system work: every open, read, walk and delete under the cache root,
and the per-user key file (docs/supply-chain.md, "Verdict cache").

Nothing here follows a symlink below the cache root: `check_tree` refuses a root whose `v1/` or
CACHEDIR.TAG is a symlink (a planted `v1 -> /home/victim` would otherwise have `cache clear`
empty the victim's folder and scans write entries into it), folders are opened one component at
a time with O_NOFOLLOW, and `remove_tree` deletes relative to its parent's descriptor, so a
symlink met anywhere is removed as a link, never followed. Only the root itself may be a symlink:
it is the folder the user named.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from amdet_gate.files import NotRegular, TooLarge, read_regular_at

ENTRIES = "v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
TAG_FILE = "CACHEDIR.TAG"
MAX_FILES = 256
MAX_DEPTH = 4  # path components, e.g. images/x.png is 2
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a planted FIFO must not hang the scan
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
HARDENED = bool(_NOFOLLOW and _DIRECTORY) and os.open in os.supports_dir_fd


class BadEntry(Exception):
    """An entry that failed verification; the message says why, in a few words."""


class EntryNotRegular(BadEntry):
    """A symlink, FIFO, device or folder where a regular file was expected."""


class EntryTooLarge(BadEntry):
    """More bytes than allowed or recorded."""


def check_rel(rel: Any) -> str:
    """A relative POSIX path inside the entry: no absolute, no `..`, no backslash, no NUL."""
    if not isinstance(rel, str) or not rel or len(rel) > 255 or "\\" in rel or "\0" in rel:
        raise BadEntry(f"unsafe path {rel!r}")
    parts = rel.split("/")
    if rel.startswith("/") or len(parts) > MAX_DEPTH or any(p in ("", ".", "..") for p in parts):
        raise BadEntry(f"unsafe path {rel!r}")
    return rel


def open_dir_at(dir_fd: int, rel: str) -> int:
    """Open a folder below dir_fd one component at a time, never through a symlink."""
    fd = os.dup(dir_fd)
    try:
        for part in rel.split("/"):
            nxt = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at(dir_fd: int, rel: str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file dir_fd/rel, every component opened without
    following symlinks (files.read_regular_at, the one capped reader).

    Raises EntryNotRegular (symlink, FIFO, ...), EntryTooLarge (more than `limit` bytes), OSError.
    """
    head, _, name = rel.rpartition("/")
    parent = open_dir_at(dir_fd, head) if head else os.dup(dir_fd)
    try:
        return read_regular_at(parent, name, limit)
    except NotRegular as exc:
        raise EntryNotRegular(f"{rel} is {exc}") from None
    except TooLarge:
        raise EntryTooLarge(f"{rel} is larger than allowed or recorded") from None
    finally:
        os.close(parent)


def walk(dir_fd: int, rel: str) -> dict[str, int]:
    """Relative path -> size of every regular file below dir_fd/rel; anything else is an error."""
    found: dict[str, int] = {}
    seen = [0]  # every directory entry counts, so a folder bomb of empty dirs is cut short too

    def visit(fd: int, prefix: str, depth: int) -> None:
        with os.scandir(fd) as it:
            for item in it:
                seen[0] += 1
                if seen[0] > 4 * MAX_FILES or depth >= MAX_DEPTH:
                    raise BadEntry("too many files, or folders too deep")
                path = f"{prefix}{item.name}"
                st = item.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    found[path] = st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    sub = open_dir_at(fd, item.name)
                    try:
                        visit(sub, f"{path}/", depth + 1)
                    finally:
                        os.close(sub)
                else:
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise EntryNotRegular(f"{path} is {kind}")

    top = open_dir_at(dir_fd, rel)
    try:
        visit(top, "", 0)
    finally:
        os.close(top)
    return found


# --- store and restore ---------------------------------------------------------------------


def remove_tree(path: Path) -> None:
    """Delete a file, link or folder without following any symlink; best effort.

    The parent folder is opened without following symlinks too (a symlinked `v1/` is never
    entered), and everything below is removed relative to its parent's descriptor.
    """
    try:
        parent = os.open(path.parent, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return
    try:
        _remove_at(parent, path.name, MAX_DEPTH * 4)
    except (OSError, RecursionError):
        pass
    finally:
        os.close(parent)


def _remove_at(dir_fd: int, name: str, depth: int) -> None:
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)  # a symlink is removed, never followed
        return
    if depth <= 0:
        raise OSError(f"{name}: folders nested too deeply to remove")
    sub = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    try:
        for child in os.listdir(sub):
            _remove_at(sub, child, depth - 1)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dir_fd)


def check_tree(root: Path) -> None:
    """BadEntry if `root/v1` or `root/CACHEDIR.TAG` is a symlink, or v1 is not a folder."""
    for name in (ENTRIES, TAG_FILE):
        try:
            st = os.lstat(root / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BadEntry(f"cannot read {root / name}: {os_reason(exc)}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BadEntry(f"{root / name} is a symlink; the cache never follows one (remove it)")
        if name == ENTRIES and not stat.S_ISDIR(st.st_mode):
            raise BadEntry(f"{root / name} is not a folder")


def open_entries(root: Path) -> int | None:
    """A descriptor of `root/v1`, opened without following a symlink; None if it does not exist."""
    check_tree(root)
    try:
        return os.open(root / ENTRIES, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadEntry(f"cannot open {root / ENTRIES}: {os_reason(exc)}") from None


def open_dir(path: Path, follow: bool = False) -> int:
    """A folder's descriptor (without following a symlink at `path` unless `follow`)."""
    return os.open(path, os.O_RDONLY | _DIRECTORY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW))


def tree_size(path: Path) -> int:
    total = 0
    for base, _dirs, names in os.walk(path):  # os.walk does not follow symlinked folders
        for name in names:
            try:
                st = os.lstat(os.path.join(base, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def make_root(root: Path) -> None:
    """The cache root and `v1/` (0700), and a CACHEDIR.TAG created without following a symlink."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_tree(root)
    (root / ENTRIES).mkdir(mode=0o700, exist_ok=True)
    check_tree(root)  # made by us, or already there: either way not a symlink
    with contextlib.suppress(OSError):  # a nicety only; O_EXCL | O_NOFOLLOW: never writes through a link
        fd = os.open(root / TAG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write("Signature: 8a477f597d28d172789f06886806bc55\n"
                     "# amdet-gate verdict cache (https://bford.info/cachedir/)\n")


def load_or_create_key(path: Path) -> bytes:
    """Read the per-user key, creating it atomically (write a temp file, then link) if absent."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BadEntry(f"cannot create {path.parent}: {os_reason(exc)}") from None
    for _ in range(3):
        try:
            return _read_key(path)
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(32) + "\n")
            with contextlib.suppress(FileExistsError):  # a concurrent creator won: read theirs
                os.link(tmp, path)  # atomic publish of a complete file
        except OSError as exc:
            raise BadEntry(f"cannot create the cache key {path}: {os_reason(exc)}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    raise BadEntry(f"cannot read or create the cache key {path}")


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadEntry(f"cannot read the cache key {path}: {os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry(f"the cache key {path} is not a regular file")
        # Another user's key, or one others may read or write, authenticates nothing.
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise BadEntry(f"the cache key {path} belongs to another user")
        if st.st_mode & 0o077:
            raise BadEntry(f"the cache key {path} is readable or writable by others (chmod 600 it)")
        text = os.read(fd, 200).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not _HEX64.fullmatch(text):
        raise BadEntry(f"the cache key {path} is not 64 hex digits; delete it to make a new one")
    return bytes.fromhex(text)


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
