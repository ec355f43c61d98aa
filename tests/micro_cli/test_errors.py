from __future__ import annotations

import pytest

from micro import __version__
from micro_cli.output import report_error


def test_version(micro_cli):
    assert micro_cli("--version").assert_success().out == f"micro {__version__}\n"


def test_no_arguments_prints_help(micro_cli):
    outcome = micro_cli()
    assert outcome.exit_code == 2
    assert "Usage: micro" in outcome.out + outcome.err


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["strore"], "Did you mean 'store'"),
        (["store", "wirte"], "Did you mean 'write'?"),
        (["confg"], "Did you mean 'config'?"),
    ],
)
def test_an_unknown_command_suggests_the_closest(micro_cli, args, suggestion):
    micro_cli(*args).assert_failure(2, err=suggestion)


@pytest.mark.parametrize(
    "args",
    [
        ["store", "read"],
        ["store", "write", "k"],
        ["store", "delete"],
        ["config", "set", "path"],
        ["call"],
        ["call", "store"],
        ["env", "add", "prod"],
        ["env", "set"],
        ["get", "service"],
    ],
)
def test_missing_arguments_are_usage_errors(micro_cli, args):
    outcome = micro_cli(*args).assert_failure(2, err="Missing argument")
    assert "Usage: micro" in outcome.err


def _assert_expected(outcome, code: int, message: str) -> None:
    outcome.assert_failure(code, err=message)
    assert "Traceback" not in outcome.err + outcome.out
    if code != 2:  # usage errors come with the usage line
        assert outcome.err.startswith("Error: ")
        assert outcome.err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["store", "write", "k", "v", "--expiry", "1q"], 3, "Invalid --expiry '1q'"),
        (["store", "read", "k", "--limit", "-1"], 2, "-1 is not in the range x>=0"),
        (["store", "list", "--offset", "-1"], 2, "-1 is not in the range x>=0"),
        (["store", "write", "k", "v", "--if-version", "-1"], 2, "-1 is not in the range x>=0"),
        (["store", "read", "k", "--output", "yaml"], 2, "'yaml' is not one of"),
        (["call", "store", "Store.Read", "{"], 3, "not JSON"),
        (["env", "set", "nope"], 9, "No environment named 'nope'"),
        (["user", "namespace", "set", "a/b"], 3, "Invalid namespace 'a/b'"),
    ],
)
def test_expected_local_errors_are_one_line_with_their_exit_code(micro_cli, args, code, message):
    _assert_expected(micro_cli(*args), code, message)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["store", "read", ""], 3, "Key is empty"),
        (["store", "write", "", "v"], 3, "Key is empty"),
        (["store", "delete", ""], 3, "Key is empty"),
        (["store", "read", "k" * 5000], 3, "the limit is 2048"),
        (["store", "write", "k", "v", "--table", "no/slash"], 3, "Invalid table"),
        (["store", "read", "absent"], 4, "not found"),
        (["config", "get", "absent"], 4, "not found"),
        (["call", "store", "Store.Read", '{"kee": 1}'], 3, "kee"),
        (["get", "service", "nope"], 4, "not found"),
    ],
)
def test_expected_server_errors_are_one_line_with_their_exit_code(
    micro_server, micro_cli, args, code, message
):
    _assert_expected(micro_cli(*args), code, message)


def test_the_server_s_multi_line_detail_is_folded_into_one_line(capsys):
    report_error("invalid request:\n Available Fields: key")
    assert capsys.readouterr().err == "Error: Invalid request: Available Fields: key\n"


@pytest.mark.parametrize(
    ("detail", "shown"),
    [
        ("key is empty", "Key is empty"),
        ("b/micro/k not found", "b/micro/k not found"),
        ("'prod' is the current environment", "'prod' is the current environment"),
        ("micro.toml is invalid", "micro.toml is invalid"),
        ("--expiry is too short", "--expiry is too short"),
    ],
)
def test_only_sentences_are_capitalised(capsys, detail, shown):
    report_error(detail)
    assert capsys.readouterr().err == f"Error: {shown}\n"
