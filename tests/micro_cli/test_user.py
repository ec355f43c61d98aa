from __future__ import annotations

import json

import pytest


def test_the_default_namespace_is_micro(micro_cli):
    assert micro_cli("user", "namespace").assert_success().out == "micro\n"


def test_set_changes_the_namespace_of_the_current_environment(micro_cli):
    out = micro_cli("user", "namespace", "set", "team-a").assert_success().out
    assert out == "Namespace set to team-a in environment local\n"
    assert micro_cli("user", "namespace").out == "team-a\n"
    micro_cli("env", "add", "prod", "10.0.0.5:8081").assert_success()
    assert micro_cli("-e", "prod", "user", "namespace").out == "micro\n"


def test_flag_and_variable_override_the_saved_namespace(micro_cli, monkeypatch):
    micro_cli("user", "namespace", "set", "team-a").assert_success()
    assert micro_cli("--namespace", "team-b", "user", "namespace").out == "team-b\n"
    monkeypatch.setenv("MICRO_NAMESPACE", "team-c")
    assert micro_cli("user", "namespace").out == "team-c\n"
    assert micro_cli("-n", "team-d", "user", "namespace").out == "team-d\n"


@pytest.mark.parametrize("namespace", ["a/b", "a b", "../etc", "Upper", ""])
def test_namespaces_that_could_escape_are_refused(micro_cli, monkeypatch, namespace):
    micro_cli("user", "namespace", "set", namespace).assert_failure(3, err="Invalid namespace")
    assert micro_cli("user", "namespace").out == "micro\n"
    if namespace:  # an empty flag or variable means "not given"
        micro_cli("-n", namespace, "user", "namespace").assert_failure(3, err="Invalid namespace")
        monkeypatch.setenv("MICRO_NAMESPACE", namespace)
        micro_cli("store", "read", "k").assert_failure(3, err="Invalid namespace")


def test_store_records_are_invisible_to_other_namespaces(micro_server, micro_cli):
    micro_cli("-n", "a", "store", "write", "k", "in-a").assert_success()
    micro_cli("-n", "b", "store", "read", "k").assert_failure(4)
    micro_cli("store", "read", "k").assert_failure(4)
    assert micro_cli("-n", "b", "store", "list").out == ""
    assert micro_cli("-n", "b", "store", "tables").out == ""
    assert micro_cli("-n", "a", "store", "read", "k").out == "in-a\n"


def test_the_saved_namespace_is_carried_by_every_call(micro_server, micro_cli):
    micro_cli("user", "namespace", "set", "a").assert_success()
    micro_cli("store", "write", "k", "in-a").assert_success()
    micro_cli("config", "set", "colour", "red").assert_success()
    micro_cli("user", "namespace", "set", "b").assert_success()
    micro_cli("store", "read", "k").assert_failure(4)
    micro_cli("config", "get", "colour").assert_failure(4)
    assert micro_cli("-n", "a", "config", "get", "colour").out == "red\n"


def test_call_carries_the_namespace(micro_server, micro_cli):
    micro_cli("-n", "a", "store", "write", "k", "v").assert_success()
    micro_cli("-n", "b", "call", "store", "Store.Read", '{"key": "k"}').assert_failure(4)
    out = micro_cli("-n", "a", "call", "store", "Store.List").assert_success().out
    assert json.loads(out) == {"keys": ["k"]}
