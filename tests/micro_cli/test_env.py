from __future__ import annotations

import json


def _rows(out: str) -> dict[str, list[str]]:
    """``micro env`` rows by name: the ``*`` column first, then the other columns split on spaces."""
    rows = {}
    for line in out.splitlines()[1:]:
        mark, rest = line[:1], line[1:].split()
        rows[rest[0]] = [mark, *rest[1:]]
    return rows


def test_local_is_built_in_and_current(micro_cli):
    outcome = micro_cli("env").assert_success()
    assert outcome.out.split()[:4] == ["NAME", "ADDRESS", "TLS", "DESCRIPTION"]
    assert _rows(outcome.out)["local"][:3] == ["*", "this", "machine"]
    assert micro_cli("env", "get").out == "local\n"


def test_add_set_get_and_del(micro_cli):
    micro_cli("env", "add", "prod", "10.0.0.5:8081", "-d", "production").assert_success()
    rows = _rows(micro_cli("env").out)
    assert rows["prod"] == [" ", "10.0.0.5:8081", "no", "production"]
    assert rows["local"][0] == "*"

    micro_cli("env", "set", "prod").assert_success()
    assert micro_cli("env", "get").out == "prod\n"
    assert _rows(micro_cli("env").out)["prod"][0] == "*"

    micro_cli("env", "set", "local").assert_success()
    micro_cli("env", "del", "prod").assert_success()
    assert list(_rows(micro_cli("env").out)) == ["local"]


def test_json_listing_marks_the_current_one(micro_cli):
    micro_cli("env", "add", "prod", "10.0.0.5:8081").assert_success()
    envs = json.loads(micro_cli("env", "--output", "json").assert_success().out)
    assert [(e["name"], e["current"]) for e in envs] == [("local", True), ("prod", False)]
    assert envs[1]["address"] == "10.0.0.5:8081"


def test_an_address_without_a_port_is_tls_on_443(micro_cli):
    micro_cli("env", "add", "cloud", "api.example.com").assert_success()
    assert _rows(micro_cli("env").out)["cloud"][1:3] == ["api.example.com:443", "yes"]


def test_set_of_an_unknown_environment_names_the_known_ones(micro_cli):
    micro_cli("env", "add", "prod", "10.0.0.5:8081").assert_success()
    outcome = micro_cli("env", "set", "prdo").assert_failure(9, err="No environment named 'prdo'")
    assert "Did you mean 'prod'?" in outcome.err
    assert "Known: local, prod" in outcome.err
    assert micro_cli("env", "get").out == "local\n"


def test_the_current_environment_cannot_be_deleted(micro_cli):
    micro_cli("env", "add", "prod", "10.0.0.5:8081").assert_success()
    micro_cli("env", "set", "prod").assert_success()
    micro_cli("env", "del", "prod").assert_failure(9, err="current environment")
    assert "prod" in _rows(micro_cli("env").out)


def test_local_cannot_be_deleted_or_redefined(micro_cli):
    micro_cli("env", "del", "local").assert_failure(9, err="cannot be deleted")
    micro_cli("env", "add", "local", "10.0.0.5:8081").assert_failure(9, err="cannot be redefined")


def test_invalid_names_and_addresses_are_refused(micro_cli):
    micro_cli("env", "add", "bad name", "10.0.0.5:8081").assert_failure(3, err="Invalid environment name")
    micro_cli("env", "add", "prod", "10.0.0.5:99999").assert_failure(3, err="HOST:PORT")


def test_env_flag_and_variable_override_the_saved_choice(micro_cli, monkeypatch):
    micro_cli("env", "add", "prod", "10.0.0.5:8081").assert_success()
    assert micro_cli("--env", "prod", "env", "get").out == "prod\n"
    assert _rows(micro_cli("-e", "prod", "env").out)["prod"][0] == "*"
    monkeypatch.setenv("MICRO_ENV", "prod")
    assert micro_cli("env", "get").out == "prod\n"
    assert micro_cli("--env", "local", "env", "get").out == "local\n"


def test_an_unknown_env_flag_is_an_error(micro_cli, monkeypatch):
    micro_cli("--env", "nope", "env", "get").assert_failure(9, err="No environment named 'nope'")
    micro_cli("--env", "nope", "env").assert_failure(9, err="No environment named 'nope'")
    monkeypatch.setenv("MICRO_ENV", "nope")
    micro_cli("store", "read", "k").assert_failure(9, err="No environment named 'nope'")


def test_commands_talk_to_the_environment_s_address(micro_server, micro_cli):
    micro_cli("store", "write", "k", "v").assert_success()
    micro_cli("env", "add", "same", micro_server.address).assert_success()
    # only the local environment acts as the owner without a login
    micro_cli("-e", "same", "login", "-u", "admin", "--password", "micro").assert_success()
    assert micro_cli("-e", "same", "store", "read", "k").assert_success().out == "v\n"


def test_an_unreachable_environment_exits_5(micro_cli):
    micro_cli("env", "add", "dead", "127.0.0.1:1").assert_success()
    micro_cli("-e", "dead", "store", "read", "k").assert_failure(5, err="Cannot reach environment 'dead'")
