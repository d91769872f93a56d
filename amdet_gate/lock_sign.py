"""Signed lock files: an HMAC-SHA256 of the lock's exact bytes, in a detached `<lock>.sig`.

The lock records verdicts, and a verdict is text anyone with write access to the repository can
flip ("fail" -> "pass"). With `AMDET_LOCK_KEY` set (16+ characters, a CI secret), `scan --lock`
signs every lock it writes, `amdet-gate lock sign FILE` signs a lock a person has reviewed, and
`verify` / `lock check` check the signature; `--require-signed` refuses a lock that is unsigned.

Trust model (docs/supply-chain.md, "Signed lock"): whoever holds the key can sign, so a pull
request (which cannot read the secret) cannot make a hand-edited lock verify. HMAC is symmetric:
every job that can verify can also sign; keep the key in the scanning and deploying jobs only.
A deleted signature makes the lock unsigned (refused only with --require-signed); an older signed
lock put back verifies (its entries were genuine when signed; `verify` still hashes the weights).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from amdet_gate.errors import GateError, UsageError
from amdet_gate.files import read_capped, write_atomic
from amdet_gate.lock import MAX_LOCK_BYTES, Lock, LockError, parse_lock, signature_path
from amdet_gate.sanitise import one_line

LOCK_KEY_VARIABLE = "AMDET_LOCK_KEY"
MIN_KEY_CHARS = 16
_PREFIX = "hmac-sha256:"
_DOMAIN = b"amdet-gate/lock/v1\0"  # domain separation: this key and tag sign lock files and nothing else
MAX_SIGNATURE_BYTES = 1024


class LockSignatureError(GateError):
    """A lock that must not be trusted or extended: exit 2 when a scan would write over it."""


@dataclass(frozen=True)
class LockKey:
    secret: bytes

    def sign(self, data: bytes) -> str:
        return _PREFIX + hmac.new(self.secret, _DOMAIN + data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SignedLock:
    """A lock as read, with what its signature says: `problem` is None when it verified."""

    lock: Lock
    data: bytes
    signed: bool  # a signature file exists
    problem: str | None  # why the lock is not trusted (unsigned when required, bad signature), else None


def lock_key(env: Mapping[str, str]) -> LockKey | None:
    """The key from AMDET_LOCK_KEY, None when unset; UsageError (exit 4) when too short to be a secret."""
    value = env.get(LOCK_KEY_VARIABLE)
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise UsageError(f"{LOCK_KEY_VARIABLE} must be at least {MIN_KEY_CHARS} characters "
                         "(use a random CI secret, e.g. `openssl rand -hex 32`)")
    return LockKey(value.encode("utf-8"))


def _signature(lock: Path) -> str | None:
    path = signature_path(lock)
    if not (path.exists() or path.is_symlink()):
        return None
    return read_capped(path, MAX_SIGNATURE_BYTES, "lock signature", LockError).decode("ascii", "replace").strip()


def read_signed_lock(path: Path, env: Mapping[str, str], require_signed: bool = False) -> SignedLock:
    """Read and validate a lock and check its signature on the very bytes parsed.

    UsageError (exit 4) for --require-signed without AMDET_LOCK_KEY; LockError for an unreadable
    or invalid lock. A signature that does not match, or a missing one when required, is the
    returned `problem` (the caller's exit 1: the deployment is refused).
    """
    key = lock_key(env)
    if require_signed and key is None:
        raise UsageError(f"--require-signed needs {LOCK_KEY_VARIABLE} (the key the lock was signed with)")
    data = read_capped(path, MAX_LOCK_BYTES, "lock file", LockError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LockError(f"lock file {one_line(path)} is not UTF-8 text") from None
    lock = parse_lock(text, str(path))
    signature = _signature(path)
    problem = None
    if signature is not None and key is not None and not hmac.compare_digest(signature, key.sign(data)):
        problem = (f"{one_line(path)}: the signature does not match (edited after it was signed, or signed with "
                   f"another {LOCK_KEY_VARIABLE})")
    elif signature is None and require_signed:
        problem = f"{one_line(path)} is not signed ({one_line(signature_path(path))} is missing)"
    return SignedLock(lock, data, signature is not None, problem)


def sign_lock(path: Path, key: LockKey, data: bytes) -> None:
    """Write the detached signature of `data` (the lock's bytes) beside the lock."""
    write_atomic(signature_path(path), (key.sign(data) + "\n").encode("ascii"))


def check_writable_lock(path: Path, env: Mapping[str, str]) -> LockKey | None:
    """Before `scan --lock` adds an entry: with a key, the existing lock must verify, so a tampered (or
    never reviewed) lock is not re-signed with the new entry. Returns the key to sign with."""
    key = lock_key(env)
    if key is None or not path.exists():
        return key
    signed = read_signed_lock(path, env, require_signed=True)
    if signed.problem is not None:
        raise LockSignatureError(f"will not add to {signed.problem}; review it and run `amdet-gate lock sign "
                                 f"{one_line(path)}`, or remove it")
    return key


def write_signed_lock(path: Path, entry, env: Mapping[str, str]) -> Lock:
    """`lock.write_lock`, then, with AMDET_LOCK_KEY, the signature of the bytes just written."""
    from amdet_gate.lock import write_lock

    key = check_writable_lock(path, env)
    lock = write_lock(path, entry)
    if key is not None:
        sign_lock(path, key, lock.dumps().encode("utf-8"))
    return lock
