"""A role per service on PostgreSQL (issue 24): `bookvault services setup-postgres`.

Each service's database URL names its role and its database. For each, as an administrator:
the role is created (or altered) able to log in and nothing more (no superuser, no CREATEDB,
no CREATEROLE), with the URL's password if it has one; the database is created owned by it
(an existing one is given to it, with its tables and sequences); CONNECT and TEMPORARY are
revoked from PUBLIC and granted to that role alone. One service's credentials then cannot
open another's database: PostgreSQL refuses the connection ("permission denied for
database"), whatever pg_hba.conf's method (PostgreSQL docs, "Privileges": CONNECT). Running it
again changes nothing that is already so.

A password is sent as a SCRAM-SHA-256 verifier made here (RFC 5802, RFC 7677; PostgreSQL docs,
"Password Authentication"), never as text a server log could keep.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import URL, make_url

from .errors import StartupError

__all__ = ["ServiceDatabase", "plan", "scram_verifier", "setup"]

TIMEOUT_S = 30.0  # one statement, or one connection; CREATE DATABASE copies template1's files
RESERVED = frozenset({"postgres", "template0", "template1"})
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)


@dataclass(frozen=True)
class ServiceDatabase:
    service: str
    role: str
    database: str
    password: str | None


def plan(urls: Mapping[str, str], admin_url: str) -> list[ServiceDatabase]:
    """What the URLs ask for, refused (StartupError) unless each service has a role and a
    database of its own on PostgreSQL, neither of them the administrator's nor a system one."""
    admin = make_url(admin_url)
    found: list[ServiceDatabase] = []
    for service, url in urls.items():
        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql":
            raise StartupError(f"{service}'s database is not on PostgreSQL ({parsed.drivername}): nothing to set up")
        if not parsed.username or not parsed.database:
            raise StartupError(f"{service}'s database URL must name its role and its database, e.g. "
                               f"postgresql+asyncpg://bv_{service}@host/bv_{service}")
        if parsed.username == (admin.username or "postgres") or parsed.database in RESERVED | {admin.database}:
            raise StartupError(f"{service} would use the administrator's role or a system database "
                               f"({parsed.username}@{parsed.database}): give it its own")
        found.append(ServiceDatabase(service, parsed.username, parsed.database, parsed.password))
    for attribute in ("role", "database"):
        seen: dict[str, str] = {}
        for entry in found:
            value = getattr(entry, attribute)
            if value in seen:
                raise StartupError(f"{seen[value]} and {entry.service} share {attribute} {value}: one per service")
            seen[value] = entry.service
    return found


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as PostgreSQL stores it.
    (SASLprep of the password is left out: PostgreSQL, too, uses a password that is not valid
    UTF-8 or fails SASLprep as it is.)"""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _libpq(url: URL) -> str:
    """asyncpg takes a plain postgresql:// URL (no +driver); a password not in the URL comes
    from PGPASSWORD or the password file, as for psql."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _sql(conn: asyncpg.Connection, template: str, *args: str) -> None:
    """A utility statement with identifiers and literals quoted by the server's own format()
    (%I, %L): DDL takes no bind parameters."""
    params = ", ".join(f"${i}::text" for i in range(2, len(args) + 2))
    statement = await conn.fetchval(f"SELECT format($1::text, {params})", template, *args, timeout=TIMEOUT_S)
    await conn.execute(statement, timeout=TIMEOUT_S)


async def _role(conn: asyncpg.Connection, entry: ServiceDatabase) -> str:
    row = await conn.fetchrow("SELECT rolsuper FROM pg_roles WHERE rolname = $1", entry.role, timeout=TIMEOUT_S)
    if row is not None and row["rolsuper"]:
        raise StartupError(f"role {entry.role} ({entry.service}) is a superuser, which opens every database: "
                           f"give {entry.service} a role of its own")
    verb = "CREATE" if row is None else "ALTER"
    await _sql(conn, f"{verb} ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS", entry.role)
    if entry.password is not None:
        await _sql(conn, "ALTER ROLE %I PASSWORD %L", entry.role, scram_verifier(entry.password))
    return "created" if row is None else "kept"


async def _database(conn: asyncpg.Connection, admin: URL, entry: ServiceDatabase) -> str:
    owner = await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", entry.database,
                                timeout=TIMEOUT_S)
    if owner is None:
        await _sql(conn, "CREATE DATABASE %I OWNER %I", entry.database, entry.role)
        outcome = "created"
    else:
        if owner != entry.role:
            await _sql(conn, "ALTER DATABASE %I OWNER TO %I", entry.database, entry.role)
        outcome = "kept" if owner == entry.role else f"given to {entry.role} (was {owner}'s)"
        # Tables made before, by another role (the superuser, say), become the service's too.
        inside = await asyncpg.connect(_libpq(admin.set(database=entry.database)), timeout=TIMEOUT_S)
        try:
            statements = await inside.fetch(
                "SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, $1::text) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v') "
                "AND pg_get_userbyid(c.relowner) <> $1::text", entry.role, timeout=TIMEOUT_S)
            statements += await inside.fetch(
                "SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', n.nspname, c.relname, $1::text) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'S' "
                "AND pg_get_userbyid(c.relowner) <> $1::text", entry.role, timeout=TIMEOUT_S)
            for (statement,) in statements:
                await inside.execute(statement, timeout=TIMEOUT_S)
        finally:
            await inside.close(timeout=TIMEOUT_S)
    await _sql(conn, "REVOKE ALL ON DATABASE %I FROM PUBLIC", entry.database)
    await _sql(conn, "GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I", entry.database, entry.role)
    return outcome


async def setup(admin_url: str, urls: Mapping[str, str]) -> list[str]:
    """Roles and databases for `urls` (service -> its database URL), as `admin_url`'s role
    (a superuser, or one with CREATEROLE and CREATEDB). One line per service says what was done."""
    entries = plan(urls, admin_url)
    admin = make_url(admin_url)
    try:
        conn = await asyncpg.connect(_libpq(admin), timeout=TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        where = admin.render_as_string(hide_password=True)
        raise StartupError(f"cannot connect to {where} as administrator: {str(exc).strip() or type(exc).__name__}") \
            from None
    report = []
    try:
        for entry in entries:
            role = await _role(conn, entry)
            database = await _database(conn, admin, entry)
            report.append(f"{entry.service}: role {entry.role} {role}, database {entry.database} {database}; "
                          f"CONNECT to it: {entry.role} only")
    except asyncpg.PostgresError as exc:
        raise StartupError(f"setting up PostgreSQL failed: {exc}") from None
    finally:
        await conn.close(timeout=TIMEOUT_S)
    return report
