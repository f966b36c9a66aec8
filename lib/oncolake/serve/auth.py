"""Users, passwords and tokens: Argon2 hashes in PostgreSQL, signed JWTs, roles.

Roles, least to most: ``analyst`` reads predictions, nights and models;
``clinician`` also predicts; ``operator`` may do everything. A token is an
HS256 JWT signed with the key in ``serve.jwt_key_file`` carrying the user
(``sub``), the role, and an expiry of ``serve.session_minutes``; it is checked
on every request (signature, expiry, issuer, audience) and the user must
still exist with that role. Failed sign-ins are counted per user name and
client address; past ``serve.login_failures`` in ``serve.login_window_seconds``
the answer is 429 until the window has passed.
"""
from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from oncolake.errors import ConfigError, InputError

ROLES = ("analyst", "clinician", "operator")
MIN_KEY_BYTES = 32
MIN_PASSWORD = 8
_ISSUER = "oncolake"
_AUDIENCE = "oncolake-api"
_HASHER = PasswordHasher()
# A hash to verify against when the user does not exist: the answer takes as
# long as for a real user, so timing does not tell which names exist.
_DUMMY = _HASHER.hash("not a password of anyone")

USERS_SQL = """
CREATE SCHEMA IF NOT EXISTS oncolake;
CREATE TABLE IF NOT EXISTS oncolake.users (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role text NOT NULL CHECK (role IN ('analyst', 'clinician', 'operator')),
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now());
"""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, *roles: str) -> bool:
        return self.role in roles


def load_key(path: str) -> bytes:
    """The signing key from ``path``; :class:`ConfigError` if there is no usable one."""
    if not path:
        raise ConfigError("the API needs a signing key: set serve.jwt_key_file or ONCOLAKE_JWT_KEY_FILE to a file "
                          f"of at least {MIN_KEY_BYTES} random bytes (head -c 48 /dev/urandom | base64 > FILE)")
    try:
        key = Path(path).read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the JWT key file {path} ({err.strerror})") from err
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the JWT key file {path} holds {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return key


def ensure_schema(conn) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL client_min_messages = warning")
        conn.execute(USERS_SQL)


def add_user(conn, name: str, role: str, password: str) -> bool:
    """Create ``name`` or replace its role and password; True if it was new."""
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if len(password) < MIN_PASSWORD:
        raise InputError(f"the password must have at least {MIN_PASSWORD} characters")
    import psycopg
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO oncolake.users (name, role, password_hash) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, password_hash = EXCLUDED.password_hash, "
                "updated_at = now() RETURNING (xmax = 0)", (name, role, _HASHER.hash(password))).fetchone()
    except psycopg.errors.CheckViolation as err:
        raise InputError(f"a user name is 1-64 letters, digits or . _ @ -, got {name!r}") from err
    return bool(row[0])


def remove_user(conn, name: str) -> bool:
    with conn.transaction():
        return conn.execute("DELETE FROM oncolake.users WHERE name = %s", (name,)).rowcount > 0


def list_users(conn) -> list[dict]:
    rows = conn.execute("SELECT name, role, created_at, updated_at FROM oncolake.users ORDER BY name").fetchall()
    return [{"name": r[0], "role": r[1], "created_at": r[2].isoformat(timespec="seconds"),
             "updated_at": r[3].isoformat(timespec="seconds")} for r in rows]


def authenticate(conn, name: str, password: str) -> User | None:
    """The user if ``password`` is theirs, else None (same work either way)."""
    row = conn.execute("SELECT role, password_hash FROM oncolake.users WHERE name = %s", (name,)).fetchone()
    try:
        _HASHER.verify(row[1] if row else _DUMMY, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    return User(name, row[0]) if row else None


def current_role(conn, name: str) -> str | None:
    row = conn.execute("SELECT role FROM oncolake.users WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


def issue(key: bytes, user: User, minutes: int, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"sub": user.name, "role": user.role, "iss": _ISSUER, "aud": _AUDIENCE,
              "iat": int(now), "nbf": int(now), "exp": int(now + minutes * 60)}
    return jwt.encode(claims, key, algorithm="HS256")


class TokenError(Exception):
    """A token that does not prove who is asking: missing, malformed, forged or expired."""


def verify(key: bytes, token: str) -> User:
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], audience=_AUDIENCE, issuer=_ISSUER,
                            options={"require": ["exp", "sub", "role", "iat"]})
    except jwt.ExpiredSignatureError as err:
        raise TokenError("the token has expired: sign in again") from err
    except jwt.InvalidTokenError as err:
        raise TokenError(f"invalid token ({err})") from err
    if claims["role"] not in ROLES:
        raise TokenError("invalid token (unknown role)")
    return User(str(claims["sub"]), claims["role"])


class LoginLimiter:
    """Failed sign-ins per (user name, client address) in a sliding window."""

    def __init__(self, failures: int, window_seconds: float):
        self.failures, self.window = failures, window_seconds
        self._seen: dict[tuple[str, str], collections.deque] = {}
        self._lock = threading.Lock()

    def retry_after(self, name: str, client: str, now: float | None = None) -> int:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._prune((name.lower(), client), now)
            if len(seen) < self.failures:
                return 0
            return max(1, int(seen[0] + self.window - now + 0.999))

    def failed(self, name: str, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune((name.lower(), client), now).append(now)

    def succeeded(self, name: str, client: str) -> None:
        with self._lock:
            self._seen.pop((name.lower(), client), None)

    def _prune(self, key, now: float) -> collections.deque:
        seen = self._seen.setdefault(key, collections.deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(self._seen) > 100_000:  # bounded memory under a spray of names
            for stale in [k for k, v in self._seen.items() if not v][:50_000]:
                del self._seen[stale]
        return seen


def expires_in(minutes: int) -> int:
    return int(dt.timedelta(minutes=minutes).total_seconds())
