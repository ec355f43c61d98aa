"""``micro <service> <command> --flags`` against real services on a real daemon, in-process.

One daemon per module runs ``kitchen`` (a request with every kind of field,
echoed back) and ``greeter`` (every call shape), both registered with a
schema compiled with its proto comments, as ``micro run`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner as TyperRunner

from micro import Context, Service, errors
from micro.home import Home
from micro.testing.pytest import DaemonThread, Outcome
from micro_cli.main import app

PROTOS = Path(__file__).resolve().parents[1] / "protos"


@dataclass
class World:
    home: Path
    daemon: DaemonThread


def _schema(name: str, out: Path) -> Path:
    """The descriptor set of ``name``.proto with its comments, as the runtime's builder writes it."""
    from grpc_tools import protoc

    target = out / f"{name}.binpb"
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", "--include_source_info", "--include_imports"]
    assert protoc.main([*args, f"--descriptor_set_out={target}", str(PROTOS / f"{name}.proto")]) == 0
    return target


def _kitchen(pb: ModuleType) -> Any:
    class Kitchen:
        async def Echo(self, request: Any, context: Context) -> Any:
            return request

        async def Count(self, request: Any, context: Context) -> AsyncIterator[Any]:
            for number in range(request.count):
                yield pb.CountResponse(number=number)

        async def Sum(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.CountResponse(number=sum([r.number async for r in requests]))

        async def Chat(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                yield pb.CountResponse(number=request.number * 10)

    return Kitchen()


def _greeter(pb: ModuleType) -> Any:
    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any:
            if not request.name:
                raise errors.BadRequest("name is required")
            return pb.Response(msg=f"Hello {request.name}")

        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            for count in range(request.count):
                yield pb.StreamResponse(count=count)

        async def Collect(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.Response(msg=",".join([r.name async for r in requests]))

        async def PingPong(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for ping in requests:
                yield pb.Pong(stroke=ping.stroke)

    return Greeter()


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, kitchen_pb2: ModuleType, greeter_pb2: ModuleType
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("dynamic") / "home"
    schemas = tmp_path_factory.mktemp("schemas")
    handlers = {"kitchen": _kitchen(kitchen_pb2), "greeter": _greeter(greeter_pb2)}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MICRO_HOME", str(home))
        for name in ("MICRO_ENV", "MICRO_NAMESPACE", "MICRO_PROFILE", "MICRO_PROXY", "MICRO_SCHEMA_FILE"):
            env.delenv(name, raising=False)
        with pytest.MonkeyPatch.context() as starting:
            starting.setenv("MICRO_SERVER_ADDRESS", "127.0.0.1:0")
            starting.setenv("MICRO_API_ADDRESS", "127.0.0.1:0")
            daemon = DaemonThread(Home.from_env()).__enter__()
        services = []
        try:
            for name, handler in handlers.items():
                with pytest.MonkeyPatch.context() as starting:
                    starting.setenv("MICRO_PROXY", daemon.address)
                    starting.setenv("MICRO_SCHEMA_FILE", str(_schema(name, schemas)))
                    starting.setenv("MICRO_REGISTER_INTERVAL", "3600")  # the module outlives no TTL
                    service = Service(name)
                    service.handle(handler)
                    asyncio.run_coroutine_threadsafe(service.start(), daemon._loop).result(timeout=10)
                    services.append(service)
            yield World(home, daemon)
        finally:
            for service in services:
                asyncio.run_coroutine_threadsafe(service.stop(grace=0), daemon._loop).result(timeout=10)
            daemon.__exit__(None, None, None)


@pytest.fixture
def micro(world: World) -> Any:
    """Runs ``micro`` in-process against the world, with an empty schema cache."""
    shutil.rmtree(world.home / "data" / "cache", ignore_errors=True)

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Outcome:
        result = TyperRunner().invoke(app, list(args), input=input, env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


def documents(out: str) -> list[Any]:
    """Every JSON document printed, one per response."""
    decoder, found, text = json.JSONDecoder(), [], out.strip()
    while text:
        document, end = decoder.raw_decode(text)
        found.append(document)
        text = text[end:].lstrip()
    return found


def echo(micro: Any, *flags: str, input: str | None = None) -> dict[str, Any]:
    return json.loads(micro("kitchen", "echo", *flags, input=input).assert_success().out)


# -- calls -----------------------------------------------------------------------------------------


def test_two_words_call_an_endpoint_with_flags(micro):
    out = micro("greeter", "call", "--name=Alice").assert_success().out
    assert out == '{\n  "msg": "Hello Alice"\n}\n'
    assert json.loads(micro("greeter", "Call", "--name", "Bob").assert_success().out) == {"msg": "Hello Bob"}


def test_every_scalar_and_enum(micro):
    got = echo(
        micro,
        "--name=A",
        "--count=3",
        "--total=-5",
        "--table=7",
        "--ticket=18446744073709551615",
        "--delta=-2",
        "--price=1.5",
        "--weight=0.25",
        "--urgent",
        "--note=aGk=",
        "--size=large",
    )
    assert (got["name"], got["count"], got["total"], got["table"], got["ticket"]) == (
        "A",
        3,
        "-5",
        7,
        "18446744073709551615",
    )
    assert (got["delta"], got["price"], got["weight"], got["urgent"], got["note"], got["size"]) == (
        -2,
        1.5,
        0.25,
        True,
        "aGk=",
        "LARGE",
    )


def test_nested_three_deep_maps_repeated_and_oneof(micro):
    got = echo(
        micro,
        "--customer.email=e@x",
        "--customer_address_city=Oslo",
        "--customer-address-geo-lat=1.5",
        "--labels",
        "env=prod",
        "--labels.team=core",
        "--counts=x=5",
        "--tags=a,b",
        "--tags=c",
        "--seats=1,2",
        "--sizes=SMALL,large",
        '--guests={"email": "g"}',
        "--cash=10",
    )
    assert got["customer"] == {"email": "e@x", "address": {"city": "Oslo", "geo": {"lat": 1.5, "lng": 0.0}}}
    assert (got["labels"], got["counts"]) == ({"env": "prod", "team": "core"}, {"x": "5"})
    assert (got["tags"], got["seats"], got["sizes"]) == (["a", "b", "c"], [1, 2], ["SMALL", "LARGE"])
    assert got["guests"] == [{"email": "g"}]
    assert got["cash"] == "10" and "card" not in got


def test_well_known_types(micro):
    got = echo(
        micro,
        "--placed=2024-05-01T14:00:00+02:00",
        "--wait=1h30m",
        '--extra={"a": [1, "x"]}',
        "--comment=hi",
        "--priority=0",
    )
    assert (got["placed"], got["wait"], got["extra"]) == ("2024-05-01T12:00:00Z", "5400s", {"a": [1.0, "x"]})
    assert (got["comment"], got["priority"]) == ("hi", 0)


def test_data_is_merged_with_flags_and_flags_win(micro):
    data = (
        '{"name": "data", "count": 1, "customer": {"email": "d", "address": {"city": "Rome"}}, "card": "1"}'
    )
    got = echo(micro, "--data", data, "--count=2", "--customer.email=flag", "--cash=3")
    assert (got["name"], got["count"], got["customer"]["email"]) == ("data", 2, "flag")
    assert got["customer"]["address"]["city"] == "Rome"
    assert got["cash"] == "3" and "card" not in got


def test_data_dash_reads_the_body_from_stdin(micro):
    got = echo(micro, "--data", "-", "--count=9", input='{"name": "stdin", "count": 1}')
    assert (got["name"], got["count"]) == ("stdin", 9)


def test_a_server_stream_prints_each_message(micro):
    out = micro("kitchen", "count", "--count=3").assert_success().out
    assert documents(out) == [{"number": "0"}, {"number": "1"}, {"number": "2"}]
    assert out.startswith('{\n  "number": "0"\n}\n{')


def test_a_client_stream_reads_json_lines_from_stdin(micro):
    out = (
        micro("kitchen", "sum", input='{"number": 1}\n\n{"number": 2}\n{"number": 39}\n').assert_success().out
    )
    assert documents(out) == [{"number": "42"}]
    assert json.loads(micro("greeter", "collect", input='{"name": "a"}\n{"name": "b"}\n').out) == {
        "msg": "a,b"
    }


def test_a_client_stream_given_flags_sends_that_one_object(micro):
    out = micro("kitchen", "sum", "--number=5", input="this is not JSON\n").assert_success().out
    assert documents(out) == [{"number": "5"}]


def test_a_client_stream_stops_at_a_malformed_line(micro):
    outcome = micro("kitchen", "sum", input='{"number": 1}\nnot json\n{"number": 2}\n')
    outcome.assert_failure(2, err="Stdin line 2 is not JSON")
    assert outcome.out == ""
    outcome = micro("kitchen", "sum", input='{"number": 1}\n{"numbr": 2}\n')
    outcome.assert_failure(2, err="Stdin line 2 does not fit kitchen.CountResponse")
    assert "did you mean 'number'?" in outcome.err


def test_bidi_reads_lines_and_prints_each_response(micro):
    out = micro("kitchen", "chat", input='{"number": 1}\n{"number": 2}\n').assert_success().out
    assert documents(out) == [{"number": "10"}, {"number": "20"}]
    out = micro("greeter", "ping-pong", input='{"stroke": 1}\n{"stroke": 2}\n').assert_success().out
    assert documents(out) == [{"stroke": "1"}, {"stroke": "2"}]


def test_bidi_lines_with_data_dash_take_the_flags_on_top(micro):
    out = (
        micro("kitchen", "chat", "--data", "-", "--number=3", input='{"number": 1}\n{}\n')
        .assert_success()
        .out
    )
    assert documents(out) == [{"number": "30"}, {"number": "30"}]


# -- help ------------------------------------------------------------------------------------------


def test_one_word_lists_the_commands_with_their_comments(micro):
    out = micro("greeter").assert_success().out
    assert out.startswith(
        "Usage: micro greeter COMMAND [FLAGS]\n\n  Greeter says hello in every way gRPC can.\n"
    )
    lines = out.splitlines()
    assert "  call          Call answers once." in lines
    assert "  stream        Stream answers count times. [streams responses]" in lines
    assert "  collect       Collect joins the names it receives. [reads JSON lines from stdin]" in lines
    assert "  ping-pong     PingPong echoes each stroke. [JSON lines in, responses out]" in lines
    assert any(line.startswith("  debug health") for line in lines)
    assert micro("greeter", "--help").out == out


def test_command_help_lists_each_flag_with_type_markers_and_comment(micro):
    out = micro("kitchen", "echo", "--help").assert_success().out
    assert out.startswith("Usage: micro kitchen echo [FLAGS]\n\n  Echo returns the request as it arrived.\n")
    flags = {line.split()[0]: " ".join(line.split()) for line in out.splitlines() if line.startswith("  --")}
    assert flags["--name"] == "--name string the customer's name"
    assert flags["--count"] == "--count int32 how many dishes"
    assert flags["--urgent"] == "--urgent bool whether it is urgent (a bare flag means true)"
    assert flags["--tags"] == "--tags string (repeated)"
    assert flags["--labels"] == "--labels key=value (map)"
    assert flags["--card"] == "--card string (oneof payment)"
    assert flags["--customer.email"] == "--customer.email string the customer's email"
    assert flags["--customer.address.geo.lat"] == "--customer.address.geo.lat double"
    assert flags["--size"] == "--size Size one of SIZE_UNSPECIFIED, SMALL, LARGE"
    assert flags["--placed"].startswith("--placed timestamp RFC 3339")
    assert flags["--wait"].startswith("--wait duration")
    assert flags["--data"].startswith("--data JSON the whole request as JSON")
    assert micro("kitchen", "echo", "-h").out == out


def test_help_of_a_streaming_command_says_how_requests_are_read(micro):
    out = micro("greeter", "ping-pong", "--help").assert_success().out
    assert "--stroke int64" in out
    assert "JSON objects, one per line on stdin" in out


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nmae=x"], "Error: Unknown flag --nmae; did you mean --name?"),
        (["--count=abc"], "Error: --count: 'abc' is not an int32"),
        (
            ["--count=2147483648"],
            "Error: --count: 2147483648 is out of range for int32 (-2147483648 to 2147483647)",
        ),
        (["--size=HUGE"], "Error: --size: 'HUGE' is not a Size: use one of SIZE_UNSPECIFIED, SMALL, LARGE"),
        (["--card=1", "--cash=2"], "Error: --card and --cash are both in oneof payment: set only one"),
        (["--data={oops"], "Error: --data is not JSON"),
        (["--data=[]"], "Error: --data must be a JSON object, not list"),
        (
            ['--data={"kee": 1}'],
            "Error: The request does not fit kitchen.Order: kitchen.Order has no field 'kee'",
        ),
        (["stray"], "Error: No command 'echo stray' in service kitchen"),
    ],
)
def test_usage_errors_exit_2_with_one_line(micro, args, message):
    outcome = micro("kitchen", "echo", *args).assert_failure(2, err=message)
    assert outcome.err.count("\n") == 1
    assert outcome.out == ""


def test_an_unknown_command_lists_the_commands(micro):
    outcome = micro("kitchen", "eco").assert_failure(
        2, err="No command 'eco' in service kitchen; did you mean 'echo'?"
    )
    assert "its commands: chat, count, debug health, debug stats, echo, sum" in outcome.err


def test_an_unknown_word_suggests_a_service_or_a_builtin(micro):
    micro("kitchn").assert_failure(2, err="Unrecognized micro command: kitchn. Did you mean 'kitchen'?")
    micro("servics").assert_failure(2, err="Did you mean 'services'?")
    micro("zzzzzz").assert_failure(2, err="Unrecognized micro command: zzzzzz. See 'micro --help'")


def test_an_error_answered_by_the_service_keeps_its_exit_code(micro):
    micro("greeter", "call").assert_failure(3, err="Name is required")


def test_builtin_commands_come_first(micro):
    assert micro("env", "get").assert_success().out == "local\n"


# -- the schema cache ------------------------------------------------------------------------------


def test_help_from_the_cache_needs_no_server(micro, world):
    micro("kitchen", "echo", "--name=x").assert_success()
    cache = world.home / "data" / "cache" / "services"
    shutil.copytree(cache / "local", cache / "offline")
    micro("env", "add", "offline", "127.0.0.1:1").assert_success()
    try:
        assert "Kitchen echoes whatever it is sent." in micro("-e", "offline", "kitchen").assert_success().out
        assert "--customer.email" in micro("-e", "offline", "kitchen", "echo", "--help").assert_success().out
        micro("-e", "offline", "kitchen", "echo", "--name=x").assert_failure(5)
    finally:
        micro("env", "del", "offline").assert_success()


def test_every_call_refreshes_the_cache(micro, world):
    micro("kitchen", "echo").assert_success()
    [path] = (world.home / "data" / "cache" / "services" / "local" / "micro" / "kitchen").glob("*.json")
    fresh = json.loads(path.read_text())
    stale = {**fresh, "endpoints": [e for e in fresh["endpoints"] if e["name"] != "Kitchen.Sum"]}
    path.write_text(json.dumps(stale))
    micro("kitchen", "echo", "--name=x").assert_success()
    assert json.loads(path.read_text()) == fresh


def test_a_cached_entry_without_the_command_is_refreshed_first(micro, world):
    micro("kitchen", "echo").assert_success()
    [path] = (world.home / "data" / "cache" / "services" / "local" / "micro" / "kitchen").glob("*.json")
    fresh = json.loads(path.read_text())
    path.write_text(json.dumps({**fresh, "endpoints": [], "schema": ""}))
    out = micro("kitchen", "sum", "--number=2").assert_success().out
    assert documents(out) == [{"number": "2"}]


# -- completion ------------------------------------------------------------------------------------


def complete(micro: Any, line: str) -> list[str]:
    """What bash completion offers for the last word of ``line``."""
    words = line.split()
    cword = len(words) if line.endswith(" ") else len(words) - 1
    env = {"_MICRO_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(cword)}
    return micro(env=env).assert_success().out.split()


def test_completion_of_services_commands_and_flags(micro):
    micro("kitchen").assert_success()  # completion reads the cache: fill it
    assert "kitchen" in complete(micro, "micro kit")
    assert "store" in complete(micro, "micro st")  # the built-in command
    assert complete(micro, "micro kitchen e") == ["echo"]
    assert {"chat", "count", "echo", "sum", "debug"} <= set(complete(micro, "micro kitchen "))
    assert complete(micro, "micro kitchen debug h") == ["health"]
    assert {"--customer.email", "--customer.address.geo.lat"} <= set(
        complete(micro, "micro kitchen echo --cus")
    )
    assert complete(micro, "micro kitchen echo --size ") == ["SIZE_UNSPECIFIED", "SMALL", "LARGE"]


# -- micro-<word> programs -------------------------------------------------------------------------


def test_a_micro_word_program_on_path_takes_precedence(world, tmp_path, monkeypatch):
    script = tmp_path / "micro-greeter"
    script.write_text('#!/bin/sh\necho "plugin $* ns=${MICRO_NAMESPACE:-none}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    command = [sys.executable, "-m", "micro_cli", "-n", "team", "greeter", "call", "--name=x"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "plugin call --name=x ns=team\n"), result.stderr


def _imports(*args: str) -> set[str]:
    command = [sys.executable, "-X", "importtime", "-m", "micro_cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}


def test_help_from_the_cache_imports_no_grpc(micro):
    micro("kitchen").assert_success()
    modules = _imports("kitchen", "echo", "--help")
    assert "micro_cli.dynamic" in modules
    assert not {m for m in modules if m == "grpc" or m.startswith("grpc.")}
