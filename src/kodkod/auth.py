"""API and admin keys: the `api_tokens.yml` key file and the header checks.

`KeyStore` owns the key file. `load_or_create()` runs once at startup: it creates the file with
two fresh random keys (written atomically, mode 0600 from the first byte, never replacing a
file that appeared meanwhile) or reads the existing one; `banner()` is the text the server
prints once afterwards, and the only place key material is ever rendered. Checks re-stat the
file at most every `reload_interval_s` and re-read it when its mtime or size changed. Deleting
the file, or leaving it unreadable or invalid, revokes every key: each check then fails with a
401 until a valid file is back (fail closed, so deleting the file is a way to lock the server).
Each such state is logged once, as a warning that never shows the keys.

Checks take a header mapping and look up lower-case names (Starlette's `Headers` is
case-insensitive; a plain dict must already be lower-case):

- `check_api`: `x-api-key` alone decides if present, else `Authorization: Bearer <key>`; an
  API key or the admin key passes.
- `check_admin`: `x-admin-key` if present, else `Authorization: Bearer <key>`; only the admin
  key passes. An admin key in `x-api-key` does not satisfy an admin check.
- `permission_of`: the first present of `x-admin-key`, `x-api-key`, `authorization`.

Every key comparison is constant time and runs against every key. This module is pure: no
FastAPI; `kodkod.api.deps` turns `AuthError` into a 401.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from kodkod.fsutil import atomic_write

logger = logging.getLogger(__name__)

_KEY_BYTES = 16  # 128-bit keys, rendered as 32 lowercase hex chars


class Permission(str, Enum):
    """What a request's key allows; ADMIN includes everything API allows."""

    NONE = "none"
    API = "api"
    ADMIN = "admin"


class AuthConfigError(Exception):
    """The key file is unreadable or malformed. The message is one line and names the file."""


class AuthError(Exception):
    """A request presented no key or a wrong key; `message` is safe to send to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Keys:
    """One consistent set of keys as read from the key file."""

    api_keys: tuple[str, ...]
    admin_key: str


@dataclass(frozen=True, slots=True)
class _FileStamp:
    """What a stat tells us about the key file; a different stamp means re-read."""

    mtime_ns: int
    size: int


def generate_key() -> str:
    """A fresh random key: 16 bytes as 32 lowercase hex chars."""
    return secrets.token_hex(_KEY_BYTES)


def _digest(key: str) -> bytes:
    # Hashing first makes both sides of compare_digest the same length, so the comparison
    # time reveals neither the key's content nor its length.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _matches_any(presented: bytes, keys: tuple[str, ...]) -> bool:
    """Constant-time membership: compares against every key, never stops at a match."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, _digest(key))
    return found


def _classify(keys: Keys, presented: str) -> Permission:
    """ADMIN for the admin key, API for an API key, NONE otherwise (constant time)."""
    digest = _digest(presented)
    is_admin = hmac.compare_digest(digest, _digest(keys.admin_key))
    is_api = _matches_any(digest, keys.api_keys)
    if is_admin:
        return Permission.ADMIN
    return Permission.API if is_api else Permission.NONE


def _bearer_token(value: str) -> str | None:
    """The key in `Bearer <key>` (scheme case-insensitive), or None if malformed."""
    parts = value.split()
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def _strip_bearer(value: str) -> str:
    """`value` without a leading `Bearer ` (case-insensitive)."""
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value.strip()


def parse_keys(text: str, source: str) -> Keys:
    """Validate the key file's text; raise a one-line AuthConfigError naming `source`."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # Never include the parser's context snippet: it quotes the file, i.e. the keys.
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AuthConfigError(f"{source}: invalid YAML{where}") from None
    except yaml.YAMLError:
        raise AuthConfigError(f"{source}: invalid YAML") from None
    if not isinstance(data, dict):
        raise AuthConfigError(
            f"{source}: expected a mapping with api_key and admin_key, got {type(data).__name__}"
        )
    if "api_key" not in data:
        raise AuthConfigError(f"{source}: missing api_key")
    if "admin_key" not in data:
        raise AuthConfigError(f"{source}: missing admin_key")

    raw_api = data["api_key"]
    if isinstance(raw_api, str):
        raw_api = [raw_api]
    if (
        not isinstance(raw_api, list)
        or not raw_api
        or not all(isinstance(k, str) and k.strip() for k in raw_api)
    ):
        raise AuthConfigError(
            f"{source}: api_key must be a non-empty string or a non-empty list of non-empty strings"
        )
    admin = data["admin_key"]
    if not isinstance(admin, str) or not admin.strip():
        raise AuthConfigError(f"{source}: admin_key must be a non-empty string")
    return Keys(api_keys=tuple(k.strip() for k in raw_api), admin_key=admin.strip())


def render_keys(keys: Keys) -> str:
    """The YAML text of a key file."""
    api: str | list[str] = keys.api_keys[0] if len(keys.api_keys) == 1 else list(keys.api_keys)
    return yaml.safe_dump({"api_key": api, "admin_key": keys.admin_key}, sort_keys=False)


class KeyStore:
    """The server's keys: created or loaded at startup, hot-reloaded on access, checked here."""

    def __init__(
        self,
        path: Path,
        disabled: bool,
        reload_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.disabled = disabled
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._keys: Keys | None = None
        self._revoked = False  # the file vanished or broke after startup: no key passes
        self._stamp: _FileStamp | None = None
        self._last_stat_s = 0.0
        self._created = False

    # -- loading -----------------------------------------------------------------------------

    def load_or_create(self) -> bool:
        """Read the key file, or create it with fresh keys. True if it was created.

        With auth disabled nothing is read or created. Raises AuthConfigError.
        """
        if self.disabled:
            return False
        try:
            self._create(Keys(api_keys=(generate_key(),), admin_key=generate_key()))
            self._created = True
        except FileExistsError:
            self._keys, self._stamp = self._read()
            self._created = False
        self._last_stat_s = self._clock()
        return self._created

    def _create(self, keys: Keys) -> None:
        """Write a new key file (atomically, mode 0600); FileExistsError if one is there."""
        try:
            atomic_write(self.path, render_keys(keys), mode=0o600, exclusive=True)
            st = os.stat(self.path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise AuthConfigError(f"{self.path}: cannot create key file: {exc.strerror}") from None
        self._keys = keys
        self._stamp = _FileStamp(st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[Keys, _FileStamp]:
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
            raise AuthConfigError(f"{self.path}: cannot read key file: {reason}") from None
        return parse_keys(text, str(self.path)), _FileStamp(st.st_mtime_ns, st.st_size)

    def banner(self) -> str:
        """The startup text showing the keys: print it once; keys appear nowhere else."""
        if self.disabled:
            return "Authentication is disabled: every request is treated as admin."
        keys = self._require_keys()
        verb = "Generated new keys in" if self._created else "Loaded keys from"
        lines = [f"{verb} {self.path}"]
        for key in keys.api_keys:
            lines.append(f"  API key:   {key}")
        lines.append(f"  Admin key: {keys.admin_key}")
        return "\n".join(lines)

    # -- hot reload --------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Re-read the file if its mtime or size changed. True if new keys took effect.

        A missing, unreadable or invalid file revokes every key (one warning per file version)
        until a valid file is back.
        """
        if self.disabled:
            return False
        self._last_stat_s = self._clock()
        try:
            st = os.stat(self.path)
            stamp = _FileStamp(st.st_mtime_ns, st.st_size)
        except OSError as exc:
            if not self._revoked or self._stamp is not None:
                logger.warning(
                    "Key file %s is unavailable (%s); every key is refused until it is back",
                    self.path,
                    exc.strerror,
                )
            self._revoke(None)
            return False
        if stamp == self._stamp:
            return False
        try:
            keys, stamp = self._read()
        except AuthConfigError as exc:
            # Remember the broken version so it is reported once, not on every poll.
            logger.warning(
                "Reloading keys failed, every key is refused until the file is valid again: %s", exc
            )
            self._revoke(stamp)
            return False
        self._keys, self._stamp, self._revoked = keys, stamp, False
        logger.info("Reloaded keys from %s", self.path)
        return True

    def _revoke(self, stamp: _FileStamp | None) -> None:
        # The last good keys stay for banner(); no check passes while revoked.
        self._stamp, self._revoked = stamp, True

    @property
    def revoked(self) -> bool:
        """True while the key file is missing or invalid (every key is refused)."""
        return self._revoked

    def _current_keys(self) -> Keys:
        if self._clock() - self._last_stat_s > self.reload_interval_s:
            self.reload_if_changed()
        if self._revoked:
            raise AuthError("No key is accepted: the server's key file is missing or invalid")
        return self._require_keys()

    def _require_keys(self) -> Keys:
        if self._keys is None:
            raise RuntimeError("KeyStore.load_or_create() must run before keys are used")
        return self._keys

    # -- checks ------------------------------------------------------------------------------

    def check_api(self, headers: Mapping[str, str]) -> Permission:
        """Pass an API or admin key (x-api-key, else Authorization: Bearer, else the admin key
        in x-admin-key — an admin key is accepted wherever an API key is, so a client that
        only sends x-admin-key is not turned away from API routes); ADMIN or API."""
        if self.disabled:
            return Permission.ADMIN
        keys = self._current_keys()
        x_api_key = headers.get("x-api-key")
        if x_api_key is not None:
            presented: str | None = x_api_key
        else:
            authorization = headers.get("authorization")
            if authorization is None:
                x_admin_key = headers.get("x-admin-key")
                if x_admin_key is None:
                    raise AuthError("Please provide an API key")
                if _classify(keys, x_admin_key) is not Permission.ADMIN:
                    raise AuthError("Invalid API key")
                return Permission.ADMIN
            presented = _bearer_token(authorization)
        permission = Permission.NONE if presented is None else _classify(keys, presented)
        if permission is Permission.NONE:
            raise AuthError("Invalid API key")
        return permission

    def check_admin(self, headers: Mapping[str, str]) -> Permission:
        """Pass only the admin key (x-admin-key, else Authorization: Bearer); ADMIN."""
        if self.disabled:
            return Permission.ADMIN
        keys = self._current_keys()
        x_admin_key = headers.get("x-admin-key")
        if x_admin_key is not None:
            presented: str | None = x_admin_key
        else:
            authorization = headers.get("authorization")
            if authorization is None:
                raise AuthError("Please provide an admin key")
            presented = _bearer_token(authorization)
        if presented is None or _classify(keys, presented) is not Permission.ADMIN:
            raise AuthError("Invalid admin key")
        return Permission.ADMIN

    def caller_id(self, headers: Mapping[str, str]) -> str | None:
        """Who sent a request that passed `check_api`: a digest (never the key) of the key it
        presented, read with `check_api`'s header precedence. None with auth disabled."""
        if self.disabled:
            return None
        presented = headers.get("x-api-key")
        if presented is None:
            authorization = headers.get("authorization")
            if authorization is not None:
                presented = _bearer_token(authorization) or ""
            else:
                presented = headers.get("x-admin-key", "")
        return hashlib.sha256(b"kodkod-caller:" + presented.encode("utf-8", "surrogateescape")).hexdigest()

    def permission_of(self, headers: Mapping[str, str]) -> Permission:
        """The permission of the first present of x-admin-key, x-api-key, authorization."""
        if self.disabled:
            return Permission.ADMIN
        keys = self._current_keys()
        for name in ("x-admin-key", "x-api-key", "authorization"):
            value = headers.get(name)
            if value is not None:
                break
        else:
            raise AuthError("Please provide an API key")
        permission = _classify(keys, _strip_bearer(value))
        if permission is Permission.NONE:
            raise AuthError("Invalid API key")
        return permission


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (brackets and IPv4-mapped forms allowed)."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def disable_auth_warning(host: str) -> str | None:
    """The loud startup warning for disable_auth on a non-loopback host, else None."""
    if is_loopback_host(host):
        return None
    return (
        f"WARNING: authentication is disabled and the server listens on {host!r}, which is not "
        "a loopback address. Anyone who can reach this port has full admin access (load, "
        "unload, download models). Set network.disable_auth to false or bind to 127.0.0.1."
    )
