"""Command words to endpoints (Micro §2.4) and back (§2.3), without a server."""

from __future__ import annotations

import pytest

from micro_cli.dynamic_names import UnknownCommand, command_words, endpoint_for, kebab, micro_endpoint

HELLOWORLD = ["Helloworld.Call", "Helloworld.Stream", "Helloworld.PingPong", "Debug.Health"]
REGISTRY = ["Registry.GetService", "Registry.ListServices", "Registry.Register"]
EVENTS = ["Stream.Publish", "Stream.Consume", "Store.Read"]
STORE = ["Store.Read", "Store.Write", "Store.List"]


@pytest.mark.parametrize(
    ("service", "words", "expected"),
    [
        ("helloworld", [], "Helloworld.Call"),  # Micro's one-word form (help, in v3.13+)
        ("helloworld", ["call"], "Helloworld.Call"),
        ("registry", ["getService"], "Registry.GetService"),
        ("events", ["stream", "publish"], "Stream.Publish"),
        ("store", ["read"], "Store.Read"),
    ],
)
def test_micro_builds_the_endpoint_by_capitalising_each_word(service, words, expected):
    assert micro_endpoint(service, words) == expected


@pytest.mark.parametrize(
    ("service", "words", "endpoints", "expected"),
    [
        ("helloworld", ["call"], HELLOWORLD, "Helloworld.Call"),
        ("helloworld", ["Call"], HELLOWORLD, "Helloworld.Call"),
        ("helloworld", ["ping-pong"], HELLOWORLD, "Helloworld.PingPong"),
        ("helloworld", ["pingPong"], HELLOWORLD, "Helloworld.PingPong"),
        ("helloworld", ["ping_pong"], HELLOWORLD, "Helloworld.PingPong"),
        ("helloworld", ["PINGPONG"], HELLOWORLD, "Helloworld.PingPong"),
        ("helloworld", ["debug", "health"], HELLOWORLD, "Debug.Health"),
        ("store", ["read"], STORE, "Store.Read"),
        ("registry", ["get-service"], REGISTRY, "Registry.GetService"),
        ("registry", ["getService"], REGISTRY, "Registry.GetService"),
        ("registry", ["GetService"], REGISTRY, "Registry.GetService"),
        ("registry", ["list-services"], REGISTRY, "Registry.ListServices"),
        ("events", ["stream", "publish"], EVENTS, "Stream.Publish"),
        ("events", ["Stream", "consume"], EVENTS, "Stream.Consume"),
        ("events", ["store", "read"], EVENTS, "Store.Read"),
        ("my-service", ["call"], ["MyService.Call"], "MyService.Call"),
    ],
)
def test_words_name_a_registered_endpoint(service, words, endpoints, expected):
    assert endpoint_for(service, words, endpoints) == expected


@pytest.mark.parametrize(
    ("service", "endpoint", "words"),
    [
        ("helloworld", "Helloworld.Call", ("call",)),
        ("helloworld", "Helloworld.PingPong", ("ping-pong",)),
        ("helloworld", "Debug.Health", ("debug", "health")),
        ("registry", "Registry.GetService", ("get-service",)),
        ("events", "Stream.Publish", ("stream", "publish")),
        ("my-service", "MyService.Call", ("call",)),
    ],
)
def test_help_spells_an_endpoint_as_kebab_case_words(service, endpoint, words):
    assert command_words(service, endpoint) == words
    assert endpoint_for(service, list(words), [endpoint]) == endpoint  # what help shows, works


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Call", "call"),
        ("PingPong", "ping-pong"),
        ("GetHTTPServer", "get-http-server"),
        ("V2Call", "v2-call"),
    ],
)
def test_kebab(name, expected):
    assert kebab(name) == expected


def test_an_unknown_command_lists_the_commands_and_the_closest():
    with pytest.raises(UnknownCommand) as raised:
        endpoint_for("helloworld", ["cal"], HELLOWORLD)
    message = str(raised.value)
    assert "did you mean 'call'?" in message
    assert "call, debug health, ping-pong, stream" in message
    assert raised.value.exit_code == 2


def test_a_missing_handler_is_an_unknown_command():
    with pytest.raises(UnknownCommand, match="'stream nope'"):
        endpoint_for("events", ["stream", "nope"], EVENTS)


def test_more_than_two_words_is_an_error():
    with pytest.raises(UnknownCommand, match="too many words"):
        endpoint_for("events", ["stream", "publish", "now"], EVENTS)
