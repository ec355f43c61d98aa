from __future__ import annotations

import json

BLOCKS = ["auth", "broker", "config", "events", "registry", "runtime", "store"]


def test_services_lists_the_building_blocks(micro_server, micro_cli):
    assert micro_cli("services").assert_success().out.split() == BLOCKS
    assert json.loads(micro_cli("services", "--output", "json").out) == BLOCKS


def test_the_building_blocks_are_listed_from_any_namespace(micro_server, micro_cli):
    assert micro_cli("-n", "team-a", "services").assert_success().out.split() == BLOCKS


def test_get_service_shows_nodes_and_endpoints_with_their_fields(micro_server, micro_cli):
    out = micro_cli("get", "service", "store").assert_success().out
    assert out.startswith("service  store\nversion  ")
    assert micro_server.address in out
    read = out.split("Endpoint: Store.Read\n", 1)[1].split("\nEndpoint: ", 1)[0]
    request, response = read.split("Response: ")
    assert "\tkey string\n" in request
    assert "\toptions ReadOptions {\n" in request
    assert "\t\tprefix bool\n" in request
    assert "records []Record {" in response
    assert "Endpoint: Store.List\nMetadata: stream=server\n" in out


def test_get_service_as_json(micro_server, micro_cli):
    [service] = json.loads(micro_cli("get", "service", "store", "--output", "json").assert_success().out)
    assert service["name"] == "store"
    assert "schema" not in service
    assert service["nodes"][0]["address"] == micro_server.address
    read = next(e for e in service["endpoints"] if e["name"] == "Store.Read")
    assert [v["name"] for v in read["request"]["values"]] == ["key", "options"]


def test_get_of_an_unknown_service_exits_4(micro_server, micro_cli):
    micro_cli("get", "service", "nope").assert_failure(4, err="'nope' not found; `micro services` lists them")
    micro_cli("-n", "team-a", "get", "service", "nope").assert_failure(4, err="in namespace 'team-a'")


def test_debug_health_lists_the_engines(micro_server, micro_cli):
    outcome = micro_cli("debug", "health", "--output", "json").assert_success()
    answer = json.loads(outcome.out)
    assert answer["status"] == "ok"
    assert answer["checks"] == {"store": "ok", "events": "ok", "broker": "ok", "registry": "ok"}


def test_debug_health_and_stats_of_the_server_say_server(micro_server, micro_cli):
    table = micro_cli("debug", "health").assert_success().out.splitlines()
    assert table[0] == "server: ok"
    assert [line.split()[0] for line in table[1:]] == ["ENGINE", "broker", "events", "registry", "store"]
    stats = json.loads(micro_cli("debug", "stats", "--output", "json").assert_success().out)
    assert stats["service"] == "server" and stats["requests"] >= 1


def test_debug_stats_of_a_block(micro_server, micro_cli):
    outcome = micro_cli("debug", "stats", "store", "--output", "json").assert_success()
    assert json.loads(outcome.out)["service"] == "store"
