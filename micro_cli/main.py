"""The ``micro`` command: global options, command groups, and error reporting."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from micro_cli.lazy import LazyCommand, LazyGroup

__all__ = ["COMMANDS", "app", "main"]

# The built-in commands in the order help lists them. Each module is imported only when a command
# line names it; `help` is what `micro --help` shows meanwhile (tests/micro_cli/test_lazy.py keeps
# it equal to the loaded command's).
COMMANDS: dict[str, LazyCommand] = {
    "server": LazyCommand(
        "micro_cli.server",
        "server",
        "Run the micro server (every building block) in the foreground until Ctrl-C.",
    ),
    "services": LazyCommand(
        "micro_cli.registry",
        "services",
        "List the services of the current namespace and the building blocks.",
    ),
    "call": LazyCommand(
        "micro_cli.call",
        "call",
        "Call an endpoint of a service and print the JSON response (each one, for a stream).",
    ),
    "stream": LazyCommand(
        "micro_cli.call",
        "stream",
        "Call a server-streaming endpoint and print each message as it arrives.",
    ),
    "new": LazyCommand(
        "micro_cli.new",
        "new",
        "Create a new service in the folder NAME: proto, handler, entry point, tests, README.",
    ),
    "run": LazyCommand(
        "micro_cli.runtime",
        "run_service",
        "Build and run a service from source; local folders reload on every save.",
    ),
    "update": LazyCommand(
        "micro_cli.runtime",
        "update",
        "Rebuild a service from its source and swap it in with no dropped call.",
    ),
    "kill": LazyCommand("micro_cli.runtime", "kill", "Stop a service and remove it from the runtime."),
    "status": LazyCommand(
        "micro_cli.runtime",
        "status",
        "List the services the runtime runs: NAME VERSION SOURCE STATUS BUILD UPDATED METADATA.",
    ),
    "logs": LazyCommand(
        "micro_cli.runtime", "logs", "Print a service's last log lines, and follow new ones with -f."
    ),
    "login": LazyCommand(
        "micro_cli.login",
        "login",
        "Sign in to the current environment and namespace; later commands act as that account.",
    ),
    "logout": LazyCommand(
        "micro_cli.login", "logout", "Forget the login of the current environment and namespace."
    ),
    "get": LazyCommand("micro_cli.registry", "get_app", "Show details of a resource."),
    "store": LazyCommand("micro_cli.store", "app", "Read and write records in the store."),
    "config": LazyCommand("micro_cli.config", "app", "Get and set config values and secrets."),
    "env": LazyCommand("micro_cli.environments_cmd", "app", "Choose which micro server commands talk to."),
    "user": LazyCommand("micro_cli.user", "app", "Who and where commands act as (no subcommand: who am I)."),
    "auth": LazyCommand("micro_cli.auth", "app", "Manage accounts, access rules and tokens."),
    "broker": LazyCommand(
        "micro_cli.messaging", "broker_app", "Publish and subscribe to ephemeral messages."
    ),
    "events": LazyCommand(
        "micro_cli.messaging", "events_app", "Publish, consume and read durable event streams."
    ),
    "debug": LazyCommand("micro_cli.debug", "app", "Health and statistics of services and of the server."),
}


class MicroGroup(LazyGroup):
    """Turns expected failures of any sub-command into one line and a documented exit code.

    Its built-in commands are ``COMMANDS``, each imported when a command line names it; any other
    first word is a service command.
    """

    lazy_commands = COMMANDS

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            code = _report(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """A built-in command, else the service (or ``micro-<name>`` program) of that name."""
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name and not cmd_name.startswith("-"):
            from micro_cli.dynamic import DynamicCommand

            return DynamicCommand(cmd_name, self.list_commands(ctx))
        return found

    def shell_complete(self, ctx: Any, incomplete: str) -> list[Any]:
        from micro_cli.dynamic_complete import complete_services

        builtins = self.list_commands(ctx)
        return [*super().shell_complete(ctx, incomplete), *complete_services(incomplete, builtins)]


def _report(exc: Exception) -> int | None:
    """An expected failure's exit code, once its one line is on stderr; ``None`` for anything else."""
    # Imported here: `micro --help` and completion never get this far, and every command that can
    # raise these has imported them already.
    from micro.errors import MicroError, Unauthorized
    from micro_cli.errors import HandledError, exit_code_for
    from micro_cli.output import report_error

    if isinstance(exc, HandledError):
        report_error(str(exc))
        return exc.exit_code
    if isinstance(exc, Unauthorized):
        from micro_cli.session import login_hint

        report_error(login_hint(exc.detail or "not authenticated"))
        return exit_code_for(exc)
    if isinstance(exc, MicroError):
        report_error(exc.detail or type(exc).__name__)
        return exit_code_for(exc)
    return None


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
        from micro import __version__

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
    from micro_cli.session import options

    options.env = env
    options.namespace = namespace


def main() -> None:
    # gRPC's C core logs a failed TLS handshake on stderr before our one-line message says what to do.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    app()
