"""``micro auth``: accounts, rules and tokens through the CLI, against a real daemon."""

from __future__ import annotations

import json
import time

import pytest


@pytest.fixture
def admin(micro_server, micro_cli):
    """The CLI logged in as the default admin (saved to the file)."""
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    return micro_cli


def test_list_accounts_as_a_table_and_json(admin):
    out = admin("auth", "list", "accounts").assert_success().out
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["ID", "NAME", "TYPE", "SCOPES", "METADATA"]
    assert ["admin", "admin", "user", "admin", "n/a"] in lines
    accounts = json.loads(admin("auth", "list", "accounts", "--output", "json").out)
    assert {a["id"] for a in accounts} == {"admin", "owner"}
    assert next(a for a in accounts if a["id"] == "owner")["metadata"] == {"local": "owner"}


def test_create_an_account_with_a_generated_secret_then_delete_it(admin):
    out = (
        admin("auth", "create", "account", "svc", "--type", "service", "--scopes", "a,b").assert_success().out
    )
    assert out.startswith("Account svc created in namespace micro\n")
    secret = out.split("secret:")[1].split()[0]
    assert "scopes:  a, b\n" in out
    admin("auth", "create", "token", "--id", "svc", "--secret", secret).assert_success()
    assert admin("auth", "delete", "account", "svc").assert_success().out == "Account svc deleted\n"
    assert "svc" not in admin("auth", "list", "accounts").out
    admin("auth", "delete", "account", "svc").assert_failure(4)


def test_create_account_json_and_a_given_secret_is_not_echoed(admin):
    out = admin("auth", "create", "account", "carol", "--secret", "c-pw").assert_success().out
    assert "c-pw" not in out
    data = json.loads(
        admin("auth", "create", "account", "dave", "--scopes", "x", "--scopes", "y", "--output", "json").out
    )
    assert data["id"] == "dave" and data["scopes"] == ["x", "y"] and data["secret"]
    admin("auth", "create", "account", "dave").assert_failure(7)


def test_create_an_account_in_another_namespace(admin):
    admin("auth", "create", "account", "tina", "--namespace", "team", "--secret", "t").assert_success()
    assert "tina" in admin("-n", "team", "auth", "list", "accounts").out
    assert "tina" not in admin("auth", "list", "accounts").out


def test_rules_create_list_and_delete(admin):
    assert (
        "default" in admin("auth", "list", "rules").out
    )  # written when a namespace's rules are first listed
    admin("auth", "create", "rule", "onlyloggedin", "--scope", "*", "--resource", "*:*:*").assert_success()
    out = (
        admin(
            "auth",
            "create",
            "rule",
            "nostore",
            "--resource",
            "service:store:*",
            "--access",
            "denied",
            "--priority",
            "5",
            "--scope",
            "+",
        )
        .assert_success()
        .out
    )
    assert out == "Rule nostore created: denied + on service:store:* (priority 5)\n"
    lines = [line.split() for line in admin("auth", "list", "rules").assert_success().out.splitlines()]
    assert lines[0] == ["ID", "SCOPE", "ACCESS", "RESOURCE", "PRIORITY"]
    assert lines[1] == ["nostore", "+", "denied", "service:store:*", "5"]  # highest priority first
    assert ["default", "<public>", "granted", "*:*:*", "0"] in lines
    rules = json.loads(admin("auth", "list", "rules", "--output", "json").out)
    assert {
        "id": "onlyloggedin",
        "scope": "*",
        "access": "granted",
        "resource": "*:*:*",
        "priority": 0,
    } in rules
    assert admin("auth", "delete", "rule", "nostore").assert_success().out == "Rule nostore deleted\n"
    assert "nostore" not in admin("auth", "list", "rules").out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--resource", "nocolons"], 3, "type:name:endpoint"),
        (["--resource", "*:*:*", "--access", "maybe"], 2, "maybe"),
        (["--resource", "a b:c:d"], 3, "resource"),
    ],
)
def test_bad_rules_are_refused(admin, args, code, message):
    admin("auth", "create", "rule", "bad", *args).assert_failure(code, err=message)


def test_check_prints_the_decision_and_the_rule(admin):
    admin("auth", "create", "account", "bob", "--secret", "b").assert_success()
    out = (
        admin("auth", "check", "--account", "bob", "--resource", "service:store:Store.Read")
        .assert_success()
        .out
    )
    assert out.splitlines()[0] == "granted: account bob on service:store:Store.Read in namespace micro"
    assert "rule:    default (granted <public> on *:*:*, priority 0)\n" in out
    admin(
        "auth",
        "create",
        "rule",
        "bob-no-read",
        "--scope",
        "*",
        "--resource",
        "service:store:Store.Read",
        "--access",
        "denied",
        "--priority",
        "1",
    ).assert_success()
    out = admin("auth", "check", "--account", "bob", "--resource", "service:store:Store.Read").out
    assert out.startswith("denied: account bob on service:store:Store.Read")
    assert "rule:    bob-no-read (denied * on service:store:Store.Read, priority 1)\n" in out
    data = json.loads(
        admin(
            "auth", "check", "--account", "bob", "--resource", "service:store:Store.Read", "--output", "json"
        ).out
    )
    assert data["granted"] is False and data["rule"]["id"] == "bob-no-read" and data["reason"]


def test_check_with_no_matching_rule_says_so(admin):
    admin("auth", "list", "rules").assert_success()
    admin("auth", "delete", "rule", "default").assert_success()
    out = admin("auth", "check", "--resource", "service:store:Store.Read").assert_success().out
    assert out.startswith("denied: an anonymous caller on service:store:Store.Read")
    assert "rule:    none matched\n" in out


def test_check_an_unknown_account(admin):
    admin("auth", "check", "--account", "ghost", "--resource", "*:*:*").assert_failure(4)


def test_create_token_prints_tokens(admin):
    admin("auth", "create", "account", "bob", "--secret", "b-pw").assert_success()
    out = (
        admin("auth", "create", "token", "--id", "bob", "--secret", "b-pw", "--expiry", "2m")
        .assert_success()
        .out
    )
    assert out.startswith("access token:   eyJ")
    assert "refresh token:" in out and "(in 1" in out
    data = json.loads(
        admin(
            "auth", "create", "token", "--id", "bob", "--secret", "b-pw", "--expiry", "60", "--output", "json"
        ).out
    )
    assert data["expiry"] - data["created"] == 60
    assert data["expiry"] > time.time()
    admin("auth", "create", "token", "--id", "bob", "--secret", "nope").assert_failure(
        6, err="wrong id or secret"
    )


def test_create_token_prompts_for_the_secret(admin):
    admin("auth", "create", "account", "bob", "--secret", "b-pw").assert_success()
    out = admin("auth", "create", "token", "--id", "bob", input="b-pw\n").assert_success().out
    assert "access token:" in out


def test_update_secret(admin):
    admin("auth", "create", "account", "bob", "--secret", "old").assert_success()
    out = admin("auth", "update", "secret", "bob", "--secret", "new").assert_success().out
    assert out == "Secret of bob changed; its tokens no longer work\n"
    admin("auth", "create", "token", "--id", "bob", "--secret", "old").assert_failure(6)
    admin("auth", "create", "token", "--id", "bob", "--secret", "new").assert_success()
    admin("auth", "update", "secret", "bob", input="newer\nnewer\n").assert_success()
    admin("auth", "create", "token", "--id", "bob", "--secret", "newer").assert_success()


def test_a_non_admin_account_is_refused_with_403(admin):
    admin("auth", "create", "account", "bob", "--secret", "b-pw").assert_success()
    admin("login", "-u", "bob", "--password", "b-pw").assert_success()
    outcome = admin("auth", "list", "accounts").assert_failure(6)
    assert outcome.err == (
        "Error: Account 'bob' is not an administrator of namespace 'micro' "
        "(a user with scope admin, or a service with scope service)\n"
    )
    admin("auth", "check", "--resource", "*:*:*").assert_failure(6, err="not an administrator")
    admin("auth", "update", "secret", "admin", "--secret", "x").assert_failure(6)


def test_another_namespace_admin_cannot_cross(admin):
    admin("auth", "create", "account", "tina", "--namespace", "team", "--secret", "t", "--scopes", "admin")
    admin("-n", "team", "login", "-u", "tina", "--password", "t").assert_success()
    assert "tina" in admin("-n", "team", "auth", "list", "accounts").assert_success().out
    admin("-n", "team", "auth", "list", "accounts", "--output", "json").assert_success()
    outcome = admin("-n", "team", "auth", "create", "account", "x", "--namespace", "micro")
    outcome.assert_failure(6, err="may not use namespace 'micro'")


def test_the_auth_commands_show_in_help(micro_cli):
    out = micro_cli("auth", "--help").assert_success().out
    for word in ("list", "create", "delete", "update", "check"):
        assert word in out
