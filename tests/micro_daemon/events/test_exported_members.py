"""The public API of the messaging modules: `__all__` in ruff's order, and every name resolves."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "micro.testing.messaging",
    "micro_daemon.broker.backend",
    "micro_daemon.broker.memory",
    "micro_daemon.broker.service",
    "micro_daemon.events.backend",
    "micro_daemon.events.engine",
    "micro_daemon.events.group",
    "micro_daemon.events.log",
    "micro_daemon.events.memory",
    "micro_daemon.events.saving",
    "micro_daemon.events.service",
    "micro_daemon.events.jetstream",
    "micro_daemon.events.jetstream_consumer",
    "micro_daemon.events.jetstream_groups",
    "micro_daemon.events.jetstream_queries",
    "micro_daemon.events.jetstream_retention",
    "micro_daemon.events.jetstream_wire",
    "micro_daemon.events.jetstream_writer",
    "micro_daemon.events.sqlite",
    "micro_daemon.sqlite_writer",
]


def _isort_style(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__, key=_isort_style)
    for attribute in module.__all__:
        assert getattr(module, attribute) is not None
