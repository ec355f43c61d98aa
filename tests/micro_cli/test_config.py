from __future__ import annotations

import json


def test_objects_merge_with_what_is_there(micro_server, micro_cli):
    micro_cli("config", "set", "db", '{"host": "h", "port": 5432}').assert_success()
    micro_cli("config", "set", "db", '{"user": "u"}').assert_success()
    out = micro_cli("config", "get", "db").assert_success().out
    assert json.loads(out) == {"host": "h", "port": 5432, "user": "u"}


def test_a_dotted_path_sets_one_leaf(micro_server, micro_cli):
    micro_cli("config", "set", "db.host", "h").assert_success()
    micro_cli("config", "set", "db.port", "5432").assert_success()
    assert json.loads(micro_cli("config", "get").out) == {"db": {"host": "h", "port": 5432}}


def test_a_scalar_replaces_an_object(micro_server, micro_cli):
    micro_cli("config", "set", "db", '{"host": "h"}').assert_success()
    micro_cli("config", "set", "db", "off").assert_success()
    assert micro_cli("config", "get", "db").out == "off\n"


def test_strings_print_bare_unless_json_is_asked_for(micro_server, micro_cli):
    micro_cli("config", "set", "greeting", '"hello"').assert_success()
    assert micro_cli("config", "get", "greeting").out == "hello\n"
    assert micro_cli("config", "get", "greeting", "--output", "json").out == '"hello"\n'


def test_a_value_that_is_not_json_is_stored_as_a_string(micro_server, micro_cli):
    micro_cli("config", "set", "motto", "hello world {").assert_success()
    micro_cli("config", "set", "count", "5").assert_success()
    micro_cli("config", "set", "enabled", "true").assert_success()
    assert json.loads(micro_cli("config", "get").out) == {
        "motto": "hello world {",
        "count": 5,
        "enabled": True,
    }


def test_secrets_are_masked_unless_asked_for(micro_server, micro_cli):
    micro_cli("config", "set", "db.host", "h").assert_success()
    micro_cli("config", "set", "db.password", "s3cret", "--secret").assert_success()
    assert micro_cli("config", "get", "db.password").out == "[secret]\n"
    assert json.loads(micro_cli("config", "get", "db").out) == {"host": "h", "password": "[secret]"}
    assert micro_cli("config", "get", "db.password", "--secret").out == "s3cret\n"
    assert json.loads(micro_cli("config", "get", "db", "-s").out) == {"host": "h", "password": "s3cret"}


def test_del_removes_a_value_and_everything_below_it(micro_server, micro_cli):
    micro_cli("config", "set", "db", '{"host": "h", "pool": {"size": 5}}').assert_success()
    micro_cli("config", "del", "db.pool").assert_success()
    micro_cli("config", "get", "db.pool.size").assert_failure(4, err="not found")
    assert json.loads(micro_cli("config", "get", "db").out) == {"host": "h"}


def test_an_empty_namespace_has_an_empty_tree(micro_server, micro_cli):
    assert micro_cli("config", "get").assert_success().out == "{}\n"


def test_a_missing_path_exits_4(micro_server, micro_cli):
    micro_cli("config", "get", "absent").assert_failure(4, err="'absent' not found")
