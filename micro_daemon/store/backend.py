"""The store backend interface every store engine implements.

A backend keeps records by ``(database, table, key)``. The store service
(``micro_daemon.store.service``) validates requests and applies defaults, then
calls one of these methods. Backends raise only ``micro.errors`` exceptions
(``NotFound``, ``Conflict``), converting their engine's errors at the boundary.

Conformance: ``micro.testing.contracts.StoreContract`` is the suite every
backend must pass; a new backend subclasses it and provides a ``backend``
fixture.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

Order = Literal["asc", "desc"]

SYSTEM_DATABASE = "_micro"
"""Where the daemon keeps its own records (accounts, rules, config trees, runtime services).

Not a valid namespace name, so the store block, which only opens namespaces'
databases, can never reach it: a user of namespace ``micro`` must not read the
accounts' secret hashes or another namespace's config.
"""


@dataclass(frozen=True)
class Field:
    """One typed metadata value of a record."""

    type: str
    value: str


@dataclass(frozen=True)
class Record:
    """A stored record.

    ``expires_at`` is an absolute unix time in seconds (``None``: never
    expires). ``version`` is set by the backend: 1 on creation, +1 on every
    write; callers pass 0.
    """

    key: str
    value: bytes
    expires_at: float | None = None
    metadata: dict[str, Field] = field(default_factory=dict)
    version: int = 0


@dataclass(frozen=True)
class Query:
    """Which records a ``read`` or ``list`` selects, and in what order.

    Keys are filtered by ``prefix`` and/or ``suffix`` (both empty: every key),
    sorted by key in ``order``, then ``offset`` are skipped and at most
    ``limit`` returned (0: no limit). Expired records are never selected.
    Matching is literal and case-sensitive (no wildcards); key order is
    Unicode code point order, which is UTF-8 byte order (PostgreSQL: ``COLLATE "C"``).
    """

    prefix: str = ""
    suffix: str = ""
    limit: int = 0
    offset: int = 0
    order: Order = "asc"


class StoreBackend(abc.ABC):
    """A store engine. Implementations must be safe to call concurrently from one event loop."""

    @abc.abstractmethod
    async def get(self, database: str, table: str, key: str) -> Record:
        """Return the record with exactly ``key``.

        Raises ``micro.errors.NotFound`` if it is absent or expired.
        """

    @abc.abstractmethod
    async def query(self, database: str, table: str, query: Query) -> list[Record]:
        """Return the live records that ``query`` selects, in its order."""

    @abc.abstractmethod
    async def keys(self, database: str, table: str, query: Query) -> list[str]:
        """Return the keys of the live records that ``query`` selects, in its order."""

    @abc.abstractmethod
    async def put(self, database: str, table: str, record: Record, *, if_version: int | None = None) -> int:
        """Store ``record`` (its ``version`` is ignored) and return its new version.

        Durable once this returns. ``if_version``: write only if the stored
        live record has that version, or with 0 only if no live record exists;
        otherwise raise ``micro.errors.Conflict`` and change nothing. An
        expired record counts as absent and its version restarts at 1.
        """

    @abc.abstractmethod
    async def delete(self, database: str, table: str, key: str) -> None:
        """Remove the record with ``key``. Raises ``micro.errors.NotFound`` if absent or expired."""

    @abc.abstractmethod
    async def databases(self) -> list[str]:
        """Sorted names of the databases that hold at least one live record."""

    @abc.abstractmethod
    async def tables(self, database: str) -> list[str]:
        """Sorted names of the tables of ``database`` that hold at least one live record."""

    @abc.abstractmethod
    async def purge_expired(self) -> int:
        """Remove expired records for good; return how many. Called periodically by the daemon."""

    async def health(self) -> str:
        """``"ok"``, or a short description of what is wrong with the engine."""
        return "ok"

    async def close(self) -> None:  # noqa: B027  # optional hook, nothing to do by default
        """Release connections and files. Called once at shutdown; must not raise."""
