"""PostgreSQL access for the export job and the API: URLs without passwords.

A database URL names host, port, database and user, never a password (one
in it is refused, so it cannot reach a command line or a log). The password
comes from ``PGPASSWORD``, else the libpq password file ``serve.database_passfile``
(``PGPASSFILE`` format; ``scripts/postgres.sh`` writes it), and is handed to
psycopg and to Spark's JDBC writer as a connection property.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from oncolake.config import Config
from oncolake.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Database:
    host: str
    port: int
    name: str
    user: str
    password: str | None

    @property
    def url(self) -> str:
        """The URL as given, without a password: safe to log."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"

    @property
    def jdbc_url(self) -> str:
        return f"jdbc:postgresql://{self.host}:{self.port}/{self.name}"

    def jdbc_properties(self) -> dict[str, str]:
        props = {"user": self.user, "driver": "org.postgresql.Driver"}
        if self.password is not None:
            props["password"] = self.password
        return props

    def connect(self, **kwargs):
        """A psycopg connection (autocommit off: every write is one explicit transaction)."""
        import psycopg
        try:
            return psycopg.connect(host=self.host, port=self.port, dbname=self.name, user=self.user,
                                   password=self.password, connect_timeout=10,
                                   application_name="oncolake", **kwargs)
        except psycopg.OperationalError as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise InputError(f"cannot connect to {self.url}: {first}") from err


def database(cfg: Config, url: str | None = None, environ: dict[str, str] | None = None) -> Database:
    """The database of ``url`` (default ``serve.database_url``) with its password looked up."""
    environ = os.environ if environ is None else environ
    raw = url or cfg.serve.database_url
    parts = urlsplit(raw)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ConfigError(f"a database URL is postgresql://USER@HOST:PORT/DATABASE, got {_safe(raw)}")
    if parts.password is not None:
        raise ConfigError("the database URL must not carry a password: put it in PGPASSWORD or "
                          "the password file serve.database_passfile (ONCOLAKE_DATABASE_PASSFILE)")
    name = parts.path.lstrip("/") or "oncolake"
    user = unquote(parts.username or "oncolake")
    port = parts.port or 5432
    password = environ.get("PGPASSWORD") or _from_passfile(
        _passfile(cfg, environ), parts.hostname, port, name, user)
    return Database(parts.hostname, port, name, user, password)


def _passfile(cfg: Config, environ) -> Path | None:
    name = cfg.serve.database_passfile or environ.get("PGPASSFILE", "")
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else ROOT / path


def _from_passfile(path: Path | None, host: str, port: int, name: str, user: str) -> str | None:
    """The password for the first matching line of a libpq password file (``*`` matches anything)."""
    if path is None or not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = _split_pgpass(line)
        if len(fields) != 5:
            continue
        want = (host, str(port), name, user)
        if all(f == "*" or f == w for f, w in zip(fields[:4], want)):
            return fields[4]
    return None


def _split_pgpass(line: str) -> list[str]:
    """Fields separated by ``:``; ``\\:`` and ``\\\\`` escape (libpq's rules)."""
    fields, current, escaped = [], [], False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return repr(url)
    return repr(url.replace(f":{parts.password}@", ":***@"))
