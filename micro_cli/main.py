"""The ``micro`` command: global options, command groups, and error reporting."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from micro import __version__
from micro.errors import MicroError, Unauthorized
from micro_cli import (
    auth,
    call,
    config,
    debug,
    environments_cmd,
    login,
    messaging,
    new,
    registry,
    runtime,
    server,
    store,
    user,
)
from micro_cli.errors import HandledError, exit_code_for
from micro_cli.output import report_error
from micro_cli.session import login_hint, options

__all__ = ["app", "main"]


class MicroGroup(TyperGroup):
    """Turns expected failures of any sub-command into one line and a documented exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HandledError as exc:
            report_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except Unauthorized as exc:
            report_error(login_hint(exc.detail or "not authenticated"))
            raise typer.Exit(exit_code_for(exc)) from None
        except MicroError as exc:
            report_error(exc.detail or type(exc).__name__)
            raise typer.Exit(exit_code_for(exc)) from None

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """A built-in command, else the service (or ``micro-<name>`` program) of that name."""
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name and not cmd_name.startswith("-"):
            from micro_cli.dynamic import DynamicCommand

            return DynamicCommand(cmd_name, self.commands)
        return found

    def shell_complete(self, ctx: Any, incomplete: str) -> list[Any]:
        from micro_cli.dynamic_complete import complete_services

        return [*super().shell_complete(ctx, incomplete), *complete_services(incomplete, self.commands)]


app = typer.Typer(
    name="micro",
    cls=MicroGroup,
    help="micro: build, run and call Python services.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: rendering it with rich costs more than the rest of start-up
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"micro {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    env: Annotated[
        str | None,
        typer.Option("--env", "-e", envvar="MICRO_ENV", help="Environment to use for this command."),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace", "-n", envvar="MICRO_NAMESPACE", help="Namespace to use for this command."
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    options.env = env
    options.namespace = namespace


app.command("server", help=server.server.__doc__)(server.server)
app.command("services")(registry.services)
app.add_typer(registry.get_app, name="get")
app.command("call")(call.call)
app.command("stream")(call.stream)
app.command("new")(new.new)
app.command("run")(runtime.run_service)
app.command("update")(runtime.update)
app.command("kill")(runtime.kill)
app.command("status")(runtime.status)
app.command("logs")(runtime.logs)
app.add_typer(store.app, name="store")
app.add_typer(config.app, name="config")
app.add_typer(environments_cmd.app, name="env")
app.add_typer(user.app, name="user")
app.command("login")(login.login)
app.command("logout")(login.logout)
app.add_typer(auth.app, name="auth")
app.add_typer(messaging.broker_app, name="broker")
app.add_typer(messaging.events_app, name="events")
app.add_typer(debug.app, name="debug")


def main() -> None:
    # gRPC's C core logs a failed TLS handshake on stderr before our one-line message says what to do.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    app()
