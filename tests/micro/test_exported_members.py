"""The public API is what ``__all__`` says, and every name in it resolves (ruff's RUF022 keeps it sorted)."""

from __future__ import annotations

import importlib

import pytest

import micro

MODULES = [
    "micro",
    "micro.client",
    "micro.codec",
    "micro.config",
    "micro.context",
    "micro.errors",
    "micro.registry",
    "micro.runtime",
    "micro.schema",
    "micro.service",
    "micro.store",
    "micro.transport",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_resolves_without_duplicates(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    for attribute in exported:
        assert getattr(module, attribute) is not None


def test_the_framework_names_are_loaded_lazily() -> None:
    assert micro.Service.__module__ == "micro.service"
    assert micro.errors.NotFound.code == 404
    with pytest.raises(AttributeError):
        micro.nothing  # noqa: B018
