"""``micro run``, ``update``, ``kill``, ``status`` and ``logs``: services from source."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro_cli.durations import parse_duration
from micro_cli.errors import HandledError, UsageError
from micro_cli.output import Output, print_json, print_table
from micro_cli.session import connect, run, target

if TYPE_CHECKING:
    from micro.client import Client
    from micro.proto import runtime_pb2

__all__ = ["kill", "logs", "run_service", "status", "update"]

STATUS_NAMES = ["unknown", "pending", "building", "starting", "running", "stopping", "stopped", "error"]
_GIT = re.compile(r"^(?:https?|file|ssh|git)://|^git@")
_SKIP_UPLOAD = {".git", ".venv", "venv", "__pycache__", "node_modules"}

OutputOption = Annotated[Output | None, typer.Option("--output", help="table or json.")]


class ServiceFailed(HandledError):
    """The service did not reach ``running``; the message has the reason."""

    exit_code = 3


def run_service(
    source: Annotated[str, typer.Argument(help="A folder ('.' for this one) or a git URL[@ref].")],
    name: Annotated[str | None, typer.Option("--name", help="Service name (default: the folder's).")] = None,
    env_vars: Annotated[
        list[str] | None,
        typer.Option("--env_vars", "--env-vars", help="KEY=VALUE for the service; repeatable."),
    ] = None,
    instances: Annotated[int, typer.Option("--instances", "-i", min=1, help="Processes to run.")] = 1,
    no_watch: Annotated[bool, typer.Option("--no-watch", help="Do not reload when files change.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a service of the same name.")] = False,
    entrypoint: Annotated[str, typer.Option("--entrypoint", help="File to run.")] = "main.py",
) -> None:
    """Build and run a service from source; local folders reload on every save."""
    env_list = _env_vars(env_vars or [])
    service_name = name or _default_name(source)
    from micro.proto import runtime_pb2

    async def go() -> bool:
        async with connect(timeout=None) as client:
            env, _ = target()
            resolved, display, watch = await _source(client, source, service_name, remote=not env.is_local)
            options = runtime_pb2.CreateOptions(
                env=env_list,
                instances=instances,
                force=force,
                watch=watch and not no_watch,
                entrypoint=entrypoint,
            )
            service = runtime_pb2.Service(name=service_name, source=resolved, metadata={"source": display})
            from micro.runtime import RuntimeClient

            await RuntimeClient(client).create(service, options)
            await _wait_running(client, service_name)
            return options.watch

    watching = " (reloads on save)" if run(go()) else ""
    print(f"{service_name} is running{watching}: micro status, micro logs {service_name}")


def update(
    service: Annotated[str, typer.Argument(help="A running service's name, or its folder.")],
    instances: Annotated[
        int, typer.Option("--instances", "-i", min=0, help="Processes to run (0: keep).")
    ] = 0,
) -> None:
    """Rebuild a service from its source and swap it in with no dropped call."""
    folder = Path(service).is_dir()
    name = _default_name(service) if folder else service

    async def go() -> None:
        from micro.runtime import RuntimeClient

        async with connect(timeout=None) as client:
            source = ""
            if folder:  # a remote environment gets the folder uploaded, as by `micro run`
                env, _ = target()
                source, _, _ = await _source(client, service, name, remote=not env.is_local)
            await RuntimeClient(client).update(name, source=source, instances=instances)

    run(go())
    print(f"{name} updated")


def kill(service: Annotated[str, typer.Argument(help="Service name, or '.' for this folder's.")]) -> None:
    """Stop a service and remove it from the runtime."""
    name = _default_name(service) if service == "." else service

    async def go() -> None:
        from micro.runtime import RuntimeClient

        async with connect() as client:
            await RuntimeClient(client).delete(name)

    run(go())
    print(f"{name} stopped")


def status(
    service: Annotated[str, typer.Argument(help="Only this service.")] = "",
    output: OutputOption = None,
) -> None:
    """List the services the runtime runs: NAME VERSION SOURCE STATUS BUILD UPDATED METADATA."""

    async def go() -> list[runtime_pb2.Service]:
        from micro.runtime import RuntimeClient

        async with connect() as client:
            return await RuntimeClient(client).read(service)

    services = run(go())
    if output is Output.json:
        print_json([_service_json(s) for s in services])
        return
    rows = [
        (
            s.name,
            s.version or "n/a",
            s.source or "n/a",
            STATUS_NAMES[s.status],
            s.metadata.get("build", "")[:7] or "n/a",
            _ago(s.metadata.get("started", "")),
            _metadata(s.metadata),
        )
        for s in services
    ]
    print_table(["NAME", "VERSION", "SOURCE", "STATUS", "BUILD", "UPDATED", "METADATA"], rows)


def logs(
    service: Annotated[str, typer.Argument(help="Service name.")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="How many last lines.")] = 15,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    since: Annotated[str | None, typer.Option("--since", help="Only lines of the last 5m, 1h, ...")] = None,
    output: Annotated[
        Output | None, typer.Option("--output", help="json prints one record per line.")
    ] = None,
) -> None:
    """Print a service's last log lines, and follow new ones with -f."""
    start = time.time() - parse_duration(since, what="--since") if since else 0.0

    async def go() -> None:
        from micro.runtime import RuntimeClient

        async with connect(timeout=None) as client:
            async for record in RuntimeClient(client).logs(service, count=lines, since=start, follow=follow):
                _print_log(record, output)

    try:
        run(go())
    except KeyboardInterrupt:
        pass


def _print_log(record: runtime_pb2.LogRecord, output: Output | None) -> None:
    if output is Output.json:
        print(
            json.dumps(
                {"timestamp": record.timestamp, "metadata": dict(record.metadata), "message": record.message}
            )
        )
    else:
        when = datetime.fromtimestamp(record.timestamp).strftime("%Y-%m-%d %H:%M:%S")
        prefix = "[runtime] " if record.metadata.get("source") == "runtime" else ""
        print(f"{when}  {prefix}{record.message}")
    sys.stdout.flush()


async def _source(client: Client, source: str, name: str, *, remote: bool) -> tuple[str, str, bool]:
    """(what the daemon resolves, what status shows, whether to watch)."""
    if _GIT.match(source):
        return source, source, False
    folder = Path(source).expanduser().resolve()
    if not folder.is_dir():
        raise UsageError(
            f"{source} is not a folder or a git URL: give a service's folder, e.g. `micro run .`"
        )
    if not remote:
        return str(folder), source if source != "." else folder.name, True
    from micro.runtime import RuntimeClient

    upload = await RuntimeClient(client).upload(name, _archive(folder))
    return upload, folder.name, False


def _archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=".", filter=_skip_heavy)
    return buffer.getvalue()


def _skip_heavy(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if set(Path(info.name).parts) & _SKIP_UPLOAD else info


async def _wait_running(client: Client, name: str) -> runtime_pb2.Service:
    from micro.runtime import RuntimeClient

    runtime = RuntimeClient(client)
    shown = ""
    while True:
        [service] = await runtime.read(name)
        state = STATUS_NAMES[service.status]
        if state != shown:
            print(f"{name}: {state}", file=sys.stderr)
            shown = state
        if state == "running":
            return service
        if state == "error":
            raise ServiceFailed(f"{name} failed: {service.metadata.get('error', 'see micro logs ' + name)}")
        await _sleep(0.1)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _env_vars(items: list[str]) -> list[str]:
    pairs = [part for item in items for part in item.split(",") if part]
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise UsageError(f"--env_vars takes KEY=VALUE, not {pair!r}")
    return pairs


def _default_name(source: str) -> str:
    if _GIT.match(source):
        base = source.rpartition("@")[0] if "@" in source.rpartition("/")[2] else source
        return base.rstrip("/").rpartition("/")[2].removesuffix(".git")
    return Path(source).expanduser().resolve().name


def _service_json(service: runtime_pb2.Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "version": service.version,
        "source": service.source,
        "status": STATUS_NAMES[service.status],
        "metadata": dict(service.metadata),
    }


def _ago(started: str) -> str:
    if not started:
        return "n/a"
    try:
        seconds = int((datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds())
    except ValueError:
        return "n/a"
    days, rest = divmod(max(0, seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m")) if v) + f"{seconds}s"
    return f"{text} ago"


def _metadata(metadata: Any) -> str:
    keys = ("group", "instances", "retries", "error")
    return ", ".join(f"{k}={metadata[k]}" for k in keys if metadata.get(k))
