from __future__ import annotations

import base64
import json


def _documents(out: str) -> list[object]:
    """Every JSON document in ``out``: a stream prints one per response."""
    decoder, documents, text = json.JSONDecoder(), [], out.strip()
    while text:
        document, end = decoder.raw_decode(text)
        documents.append(document)
        text = text[end:].lstrip()
    return documents


def test_call_prints_the_json_response(micro_server, micro_cli):
    micro_cli("store", "write", "a", "hello").assert_success()
    out = micro_cli("call", "store", "Store.Read", '{"key": "a"}').assert_success().out
    [record] = json.loads(out)["records"]
    assert record["key"] == "a"
    assert base64.b64decode(record["value"]) == b"hello"
    assert out.startswith('{\n  "records": [')


def test_call_writes_with_a_json_body(micro_server, micro_cli):
    body = json.dumps({"record": {"key": "b", "value": base64.b64encode(b"v").decode()}})
    assert json.loads(micro_cli("call", "store", "Store.Write", body).assert_success().out) == {
        "version": "1"
    }
    assert micro_cli("store", "read", "b").out == "v\n"


def test_a_streaming_endpoint_prints_each_response(micro_server, micro_cli):
    for key in ("a", "b", "c"):
        micro_cli("store", "write", key, "v").assert_success()
    out = micro_cli("call", "store", "Store.List", '{"options": {"prefix": ""}}').assert_success().out
    assert _documents(out) == [{"keys": ["a", "b", "c"]}]


def test_the_body_defaults_to_an_empty_object(micro_server, micro_cli):
    out = micro_cli("call", "store", "Store.Databases").assert_success().out
    assert json.loads(out).get("databases", []) == []


def test_dash_reads_the_body_from_stdin(micro_server, micro_cli):
    micro_cli("store", "write", "a", "v").assert_success()
    out = micro_cli("call", "store", "Store.Read", "-", input='{"key": "a"}').assert_success().out
    assert json.loads(out)["records"][0]["key"] == "a"


def test_an_unknown_endpoint_lists_the_known_ones(micro_server, micro_cli):
    outcome = micro_cli("call", "store", "Store.Nope").assert_failure(4, err="'Store.Nope' not found")
    assert "Store.Read" in outcome.err
    micro_cli("call", "store", "Read").assert_failure(4, err="'Read' not found")


def test_an_unknown_service_exits_4(micro_server, micro_cli):
    micro_cli("call", "nope", "Foo.Bar").assert_failure(4, err="Service 'nope' not found")


def test_malformed_json_exits_3(micro_server, micro_cli):
    micro_cli("call", "store", "Store.Read", "{key: a}").assert_failure(3, err="not JSON")
    micro_cli("call", "store", "Store.Read", "[1]").assert_failure(3, err="must be a JSON object")


def test_a_body_that_does_not_fit_the_request_exits_3(micro_server, micro_cli):
    outcome = micro_cli("call", "store", "Store.Read", '{"kee": "a"}').assert_failure(3, err="kee")
    assert outcome.err.count("\n") == 1


def test_an_error_answered_by_the_service_keeps_its_code(micro_server, micro_cli):
    micro_cli("call", "store", "Store.Read", '{"key": "absent"}').assert_failure(4, err="not found")
    micro_cli("call", "store", "Store.Read", '{"key": ""}').assert_failure(3, err="Key is empty")


def test_a_5mb_key_from_stdin_is_refused_with_exit_3(micro_server, micro_cli):
    body = json.dumps({"record": {"key": "k" * 5 * 1024 * 1024, "value": ""}})
    outcome = micro_cli("call", "store", "Store.Write", "-", input=body).assert_failure(3)
    assert outcome.err.startswith("Error: Key is 5242880 bytes long; the limit is 2048")
    assert outcome.err.count("\n") == 1
    assert "Traceback" not in outcome.err
