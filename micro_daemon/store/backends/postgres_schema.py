"""The PostgreSQL store's tables, created and upgraded by versioned migrations.

``migrate`` runs inside one transaction that first takes a transaction-scoped
advisory lock named after the schema, so daemons starting together queue up:
the first applies the pending migrations, the others then find nothing to do.
Applied versions are rows of ``<schema>.schema_migrations``. Migrations are
append-only: never edit one that has shipped, add the next version instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from micro.errors import SetupError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["MIGRATIONS", "Migration", "migrate", "quote_identifier"]


@dataclass(frozen=True)
class Migration:
    """One schema change: ``statements`` are SQL with ``{schema}`` standing for the quoted schema."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "records keyed by (database, tbl, key) in code point order",
        (
            # COLLATE "C" compares UTF-8 bytes: code point order, as the other engines.
            """
            CREATE TABLE {schema}.records (
                database text COLLATE "C" NOT NULL,
                tbl text COLLATE "C" NOT NULL,
                key text COLLATE "C" NOT NULL,
                value bytea NOT NULL,
                metadata jsonb NOT NULL,
                expires_at double precision,
                version bigint NOT NULL,
                PRIMARY KEY (database, tbl, key)
            ) WITH (fillfactor = 90)
            """,
            "CREATE INDEX records_expires_at ON {schema}.records (expires_at) WHERE expires_at IS NOT NULL",
        ),
    ),
)

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_MIGRATIONS_TABLE = """
CREATE TABLE {schema}.schema_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def migrate(conn: AsyncConnection[Any], schema: str) -> list[int]:
    """Create ``schema`` and apply its pending migrations; return the versions applied here.

    Raises ``SetupError`` if the schema was migrated by a newer micro than this one.
    """
    quoted = quote_identifier(schema)
    async with conn.transaction():
        await conn.execute(_LOCK, (f"micro.store.migrations:{schema}",))
        await _create_missing(conn, schema, quoted)
        cursor = await conn.execute(f"SELECT version FROM {quoted}.schema_migrations")
        applied = {row[0] for row in await cursor.fetchall()}
        _refuse_newer(schema, applied)
        done: list[int] = []
        for migration in MIGRATIONS:
            if migration.version not in applied:
                await _apply(conn, quoted, migration)
                done.append(migration.version)
        return done


async def _create_missing(conn: AsyncConnection[Any], schema: str, quoted: str) -> None:
    # Look before creating: CREATE ... IF NOT EXISTS needs the CREATE privilege even when
    # nothing is created, and a schema set up by an administrator may not grant it.
    cursor = await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (quoted,))
    if not (await cursor.fetchone() or (False,))[0]:
        await conn.execute(f"CREATE SCHEMA {quoted}")
    cursor = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quoted}.schema_migrations",))
    if not (await cursor.fetchone() or (False,))[0]:
        await conn.execute(_MIGRATIONS_TABLE.format(schema=quoted))


def _refuse_newer(schema: str, applied: set[int]) -> None:
    latest = MIGRATIONS[-1].version
    if max(applied, default=0) > latest:
        raise SetupError(
            f"the store schema {schema!r} is at version {max(applied)}, newer than this micro knows "
            f"({latest}): upgrade micro, or point MICRO_STORE_ADDRESS at another ?schema=",
            id="store",
        )


async def _apply(conn: AsyncConnection[Any], quoted: str, migration: Migration) -> None:
    for statement in migration.statements:
        await conn.execute(statement.format(schema=quoted))
    await conn.execute(
        f"INSERT INTO {quoted}.schema_migrations (version, description) VALUES (%s, %s)",
        (migration.version, migration.description),
    )
