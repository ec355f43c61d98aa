from __future__ import annotations

import json

import pytest


@pytest.fixture
def records(micro_server, micro_cli):
    for key, value in [("a1", "one"), ("a2", "two"), ("a3", "three"), ("b1", "bee"), ("x-b1", "ex")]:
        micro_cli("store", "write", key, value).assert_success()
    return micro_cli


def test_write_then_read_prints_the_value(micro_server, micro_cli):
    micro_cli("store", "write", "greeting", "hello", "world").assert_success()
    assert micro_cli("store", "read", "greeting").assert_success().out == "hello world\n"


def test_read_of_a_missing_key_exits_4(micro_server, micro_cli):
    micro_cli("store", "read", "absent").assert_failure(4, err="not found")


def test_prefix_reads_every_matching_record_in_key_order(records):
    assert records("store", "read", "--prefix", "a").assert_success().out == "one\ntwo\nthree\n"


def test_suffix_reads_every_record_ending_with_the_key(records):
    assert records("store", "read", "-s", "b1").assert_success().out == "bee\nex\n"


def test_limit_offset_and_order_page_through_a_prefix(records):
    out = records("store", "read", "-p", "a", "--order", "desc", "--offset", "1", "--limit", "1").out
    assert out == "two\n"


def test_an_unknown_order_is_refused(records):
    records("store", "read", "-p", "a", "--order", "sideways").assert_failure(3, err="asc or desc")


def test_verbose_shows_key_value_expiry_and_version(records):
    out = records("store", "read", "a1", "--verbose").assert_success().out
    header, row = out.splitlines()
    assert header.split() == ["KEY", "VALUE", "EXPIRY", "VERSION"]
    assert row.split() == ["a1", "one", "never", "1"]


def test_json_output_has_every_field(records):
    [record] = json.loads(records("store", "read", "a1", "--output", "json").assert_success().out)
    assert record == {"key": "a1", "value": "one", "expiry": 0, "version": 1, "metadata": {}}


def test_binary_values_are_shown_as_base64(micro_server, micro_cli):
    micro_cli("store", "write", "bin", "-", input=b"\xff\x00").assert_success()
    assert micro_cli("store", "read", "bin").out == "base64:/wA=\n"
    [record] = json.loads(micro_cli("store", "read", "bin", "--output", "json").out)
    assert record["value_base64"] == "/wA="


def test_value_dash_reads_stdin(micro_server, micro_cli):
    micro_cli("store", "write", "doc", "-", input="line 1\nline 2").assert_success()
    assert micro_cli("store", "read", "doc").out == "line 1\nline 2\n"


def test_expiry_sets_a_time_to_live(micro_server, micro_cli):
    micro_cli("store", "write", "session", "s", "--expiry", "1h").assert_success()
    [record] = json.loads(micro_cli("store", "read", "session", "--output", "json").out)
    assert 3590 <= record["expiry"] <= 3600
    assert micro_cli("store", "read", "session", "-v").out.splitlines()[1].split()[2] in ("3600s", "3599s")


def test_expiry_shorter_than_a_second_is_refused(micro_server, micro_cli):
    micro_cli("store", "write", "k", "v", "--expiry", "500ms").assert_failure(3, err="shorter than a second")


def test_if_version_writes_only_over_that_version(micro_server, micro_cli):
    micro_cli("store", "write", "counter", "1").assert_success()
    micro_cli("store", "write", "counter", "2", "--if-version", "1").assert_success()
    micro_cli("store", "write", "counter", "3", "--if-version", "1").assert_failure(7, err="version 2, not 1")
    assert micro_cli("store", "read", "counter").out == "2\n"


def test_if_version_0_writes_only_a_new_record(micro_server, micro_cli):
    micro_cli("store", "write", "once", "first", "--if-version", "0").assert_success()
    micro_cli("store", "write", "once", "again", "--if-version", "0").assert_failure(7, err="already exists")


def test_tables_keep_records_apart(micro_server, micro_cli):
    micro_cli("store", "write", "k", "in-users", "--table", "users").assert_success()
    micro_cli("store", "read", "k").assert_failure(4)
    assert micro_cli("store", "read", "k", "-t", "users").out == "in-users\n"
    micro_cli("store", "write", "k", "in-default").assert_success()
    assert micro_cli("store", "tables").assert_success().out == "micro\nusers\n"
    assert json.loads(micro_cli("store", "tables", "--output", "json").out) == ["micro", "users"]


def test_delete_removes_the_record(micro_server, micro_cli):
    micro_cli("store", "write", "gone", "soon").assert_success()
    micro_cli("store", "delete", "gone").assert_success()
    micro_cli("store", "read", "gone").assert_failure(4, err="not found")


def test_list_prints_keys_in_order(records):
    assert records("store", "list").assert_success().out == "a1\na2\na3\nb1\nx-b1\n"


def test_list_filters_and_pages(records):
    assert records("store", "list", "a").out == "a1\na2\na3\n"
    assert records("store", "list", "--suffix", "b1").out == "b1\nx-b1\n"
    assert records("store", "list", "a", "--order", "desc", "--limit", "2").out == "a3\na2\n"
    assert records("store", "list", "--offset", "3").out == "b1\nx-b1\n"
    assert json.loads(records("store", "list", "b", "--output", "json").out) == ["b1"]


def test_list_of_an_empty_table_prints_nothing(micro_server, micro_cli):
    assert micro_cli("store", "list", "-t", "empty").assert_success().out == ""


def test_databases_are_one_per_namespace(micro_server, micro_cli):
    micro_cli("store", "write", "k", "v").assert_success()
    micro_cli("-n", "team-a", "store", "write", "k", "v").assert_success()
    assert micro_cli("store", "databases").assert_success().out == "micro\nteam-a\n"
    assert json.loads(micro_cli("-n", "team-a", "store", "databases", "--output", "json").out) == ["team-a"]
