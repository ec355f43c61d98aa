"""``micro broker`` and ``micro events``: publish, subscribe, consume and inspect from the shell."""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro_cli.durations import parse_duration
from micro_cli.errors import UsageError
from micro_cli.output import Output, print_json, print_table
from micro_cli.session import connect, run

if TYPE_CHECKING:
    from micro.proto import events_pb2

__all__ = ["broker_app", "events_app"]

broker_app = typer.Typer(help="Publish and subscribe to ephemeral messages.", no_args_is_help=True)
events_app = typer.Typer(help="Publish, consume and read durable event streams.", no_args_is_help=True)

Message = Annotated[
    str, typer.Argument(help="The message as JSON ('-' reads stdin; not JSON: sent as text).")
]


@broker_app.command("publish")
def broker_publish(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created.")], message: Message
) -> None:
    """Send a message to every current subscriber of a topic."""
    from micro.broker import BrokerClient

    value = _message(message)

    async def go() -> None:
        async with connect() as client:
            await BrokerClient(client).publish(topic, value)

    run(go())


@broker_app.command("subscribe")
def broker_subscribe(
    topic: Annotated[str, typer.Argument(help="Topic to listen to.")],
    queue: Annotated[
        str, typer.Option("--queue", help="Share messages with other subscribers of this queue.")
    ] = "",
) -> None:
    """Print each message published to a topic (one JSON line each) until Ctrl-C."""
    from micro.broker import BrokerClient

    async def go() -> None:
        async with connect(timeout=None) as client:
            async for message in BrokerClient(client).subscribe(topic, queue=queue):
                _line({"header": dict(message.header), "body": _body(message.body, message.header)})

    _until_interrupted(go)


@events_app.command("publish")
def events_publish(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.")],
    message: Message,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE; repeatable.")
    ] = None,
) -> None:
    """Append an event to a topic; prints its id and sequence number."""
    from micro.events import EventsClient

    value = _message(message)
    pairs = _pairs(metadata or [])

    async def go() -> tuple[str, int]:
        async with connect() as client:
            return await EventsClient(client).publish(topic, value, metadata=pairs)

    event_id, sequence = run(go())
    print(json.dumps({"id": event_id, "sequence": sequence}))


@events_app.command("consume")
def events_consume(
    topic: Annotated[str, typer.Argument(help="Topic to consume.")],
    group: Annotated[
        str, typer.Option("--group", "-g", help="Consumer group (default: a private one).")
    ] = "",
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the first event.")
    ] = False,
    offset: Annotated[
        int | None, typer.Option("--offset", min=1, help="Start at this sequence number.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Start at events of the last 10m, 2h...")
    ] = None,
    if_new: Annotated[
        bool,
        typer.Option(
            "--if-new", help="Start there only if the group is new; an existing group resumes where it was."
        ),
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="Stop after this many (0: never).")] = 0,
) -> None:
    """Print a topic's events as JSON lines, acknowledged as printed."""
    from micro.events import EventsClient

    starts = sum([from_beginning, offset is not None, since is not None])
    if starts > 1:
        raise UsageError("choose one of --from-beginning, --offset and --since")
    if if_new and not starts:
        raise UsageError("--if-new goes with --from-beginning, --offset or --since")
    start = "beginning" if from_beginning else "sequence" if offset is not None else "group"
    since_time = time.time() - parse_duration(since, what="--since") if since else None

    async def go() -> None:
        async with connect(timeout=None) as client:
            # Acked once printed (an event received but not printed goes back to the group), and
            # never dead-lettered for being received by a consumer that stopped before printing it.
            consumer = EventsClient(client).consume(
                topic,
                group=group,
                start=start,
                sequence=offset or 0,
                since=since_time,
                auto_ack=False,
                retry_limit=-1,
                start_if_new=if_new,
            )
            try:
                count = 0
                async for event in consumer:
                    _line(_event_json(event))
                    await consumer.ack(event)
                    count += 1
                    if limit and count >= limit:
                        break
            finally:
                await consumer.close()

    _until_interrupted(go)


@events_app.command("read")
def events_read(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    limit: Annotated[int, typer.Option("--limit", "-l", min=1, help="At most this many.")] = 250,
    offset: Annotated[int, typer.Option("--offset", "-o", min=0, help="Skip this many first.")] = 0,
) -> None:
    """Print a topic's stored events, oldest first, as JSON lines."""
    from micro.events import EventsClient

    async def go() -> list[events_pb2.Event]:
        async with connect() as client:
            return await EventsClient(client).read(topic, limit=limit, offset=offset)

    for event in run(go()):
        _line(_event_json(event))


@events_app.command("topics")
def events_topics(
    output: Annotated[Output | None, typer.Option("--output", help="table or json.")] = None,
) -> None:
    """List topics with their event counts and each consumer group's lag."""
    from micro.events import EventsClient

    async def go() -> list[events_pb2.Topic]:
        async with connect() as client:
            return await EventsClient(client).topics()

    topics = run(go())
    if output is Output.json:
        print_json(
            [
                {
                    "name": t.name,
                    "count": t.count,
                    "last_sequence": t.last_sequence,
                    "groups": {g.name: g.lag for g in t.groups},
                }
                for t in topics
            ]
        )
        return
    rows = [
        (t.name, t.count, t.last_sequence, ", ".join(f"{g.name}={g.lag}" for g in t.groups) or "-")
        for t in topics
    ]
    print_table(["TOPIC", "EVENTS", "LAST", "GROUPS (LAG)"], rows)


def _message(text: str) -> Any:
    text = sys.stdin.read() if text == "-" else text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str]) -> dict[str, str]:
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"--metadata takes KEY=VALUE, not {item!r}")
    return dict(item.split("=", 1) for item in items)


def _body(payload: bytes, headers: Any) -> Any:
    from micro.payload import decode

    value = decode(payload, headers, None)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return value


def _event_json(event: events_pb2.Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "topic": event.topic,
        "sequence": event.sequence,
        "timestamp": event.timestamp / 1e9,
        "metadata": dict(event.metadata),
        "payload": _body(event.payload, event.metadata),
    }


def _line(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


def _until_interrupted(go: Any) -> None:
    try:
        run(go())
    except KeyboardInterrupt:
        pass
