"""Sub-commands imported and built on first use, and listed from a static table until then.

Importing every command module, and typer building every command from its signature, cost more
than the rest of ``micro``'s start-up; help, the completion of a first word and a service command
need none of them. A ``LazyGroup`` lists its sub-commands from a table of ``LazyCommand`` entries
and imports one only when a command line resolves to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup
from typer.main import get_group

__all__ = ["LazyCommand", "LazyGroup"]


class LazyCommand(NamedTuple):
    """A sub-command's import path, and the help its group lists before importing it.

    ``module``'s ``attribute`` is a ``typer.Typer`` (mounted as ``add_typer`` would) or a command
    function (registered as ``Typer.command`` would). ``help`` must be the first paragraph of the
    loaded command's help, which is all a listing shows of it: a test checks each table.
    """

    module: str
    attribute: str
    help: str

    def load(self, name: str, parent: TyperGroup) -> Any:
        """The click command of the target, built by typer as if registered on ``parent``'s app."""
        # Not importlib.import_module: -X importtime would not show the command's module.
        target = getattr(__import__(self.module, fromlist=[self.attribute]), self.attribute)
        # The settings typer hands down from an app to its commands; the others keep their defaults.
        holder = typer.Typer(
            rich_markup_mode=parent.rich_markup_mode, suggest_commands=parent.suggest_commands
        )
        if isinstance(target, typer.Typer):
            holder.add_typer(target, name=name)
        else:
            holder.command(name)(target)
        return get_group(holder).commands[name]


class LazyGroup(TyperGroup):
    """A group whose sub-commands are the entries of ``lazy_commands``, in that order.

    Listing them (help, shell completion) reads the table alone; ``get_command`` imports and builds
    the one asked for, once. Subclasses set ``lazy_commands``.
    """

    lazy_commands: ClassVar[Mapping[str, LazyCommand]] = {}
    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.lazy_commands, *(name for name in self.commands if name not in self.lazy_commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = self.commands.get(cmd_name)
        lazy = self.lazy_commands.get(cmd_name)
        if found is not None or lazy is None:
            return found
        if self._listing:
            return TyperCommand(cmd_name, help=lazy.help)  # all a listing reads: name, help, hidden
        found = self.commands[cmd_name] = lazy.load(cmd_name, self)
        return found

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with self._listing_only():
            super().format_commands(ctx, formatter)

    def shell_complete(self, ctx: Any, incomplete: str) -> list[Any]:
        with self._listing_only():
            return super().shell_complete(ctx, incomplete)

    @contextlib.contextmanager
    def _listing_only(self) -> Iterator[None]:
        # typer's listings (help, completion) ask get_command for each name: answer from the table.
        self._listing = True
        try:
            yield
        finally:
            self._listing = False
