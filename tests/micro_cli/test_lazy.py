"""The command table: what ``micro`` lists before importing a command is what the command says."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner as TyperRunner

from micro.home import Home
from micro.testing.pytest import Outcome
from micro_cli.lazy import LazyGroup
from micro_cli.main import COMMANDS, app
from micro_cli.schema_cache import CachedService, SchemaCache


def _root() -> LazyGroup:
    root = typer.main.get_command(app)
    assert isinstance(root, LazyGroup)
    return root


def _loaded(name: str) -> Any:
    root = _root()
    return root.get_command(typer.Context(root, info_name="micro"), name)


def _help(root: LazyGroup) -> str:
    return root.get_help(typer.Context(root, info_name="micro"))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_table_says_what_the_command_says(name):
    command = _loaded(name)
    assert command.name == name
    assert (command.hidden, command.deprecated, command.short_help) == (False, False, None)
    first_paragraph = (command.help or "").split("\n\n")[0]
    assert COMMANDS[name].help == " ".join(first_paragraph.split())  # all a listing shows, at any width


def test_help_lists_what_the_loaded_commands_would():
    lazy = _root()
    loaded = _root()
    for name in COMMANDS:
        loaded.get_command(typer.Context(loaded, info_name="micro"), name)
    assert _help(lazy) == _help(loaded)
    assert lazy.commands == {}  # listing imported nothing


def test_help_lists_every_command_in_table_order(micro_cli):
    out = micro_cli("--help").assert_success().out
    rows = out.split("Commands:\n", 1)[1].splitlines()
    listed = [row.split()[0] for row in rows if row.startswith("  ") and not row.startswith("   ")]
    assert listed == list(COMMANDS)


def test_a_command_is_built_once():
    root = _root()
    ctx = typer.Context(root, info_name="micro")
    assert root.get_command(ctx, "store") is root.get_command(ctx, "store")


def _cache_services(*names: str) -> None:
    cache = SchemaCache.for_home(Home.from_env())
    for name in names:
        cache.save("local", "micro", [CachedService(name, "latest", "micro")])


def _complete(line: str) -> Outcome:
    env = {"_MICRO_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": line}
    result = TyperRunner().invoke(app, [], env=env)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def test_a_builtin_command_wins_over_a_service_of_its_name(micro_home, micro_cli):
    _cache_services("store", "storage")
    assert (
        micro_cli("store", "--help").assert_success().out.startswith("Usage: micro store [OPTIONS] COMMAND")
    )
    out = _complete("micro sto").assert_success().out
    # zsh completion shows each candidate's help: the built-in's own, then the other service's.
    assert (
        out == '_arguments \'*: :(("store":"Read and write records in the store."\n"storage":"service"))\'\n'
    )


def test_completion_of_a_first_word_offers_commands_and_services(micro_home):
    _cache_services("helloworld", "sales")
    out = _complete("micro s").assert_success().out
    names = [line.split('"')[1] for line in out.split("((", 1)[1].splitlines()]
    assert names == ["server", "services", "stream", "status", "store", "sales"]
