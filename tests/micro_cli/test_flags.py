"""Flags of a request message (``kitchen.Order``: every kind of field) to its JSON body, no server."""

from __future__ import annotations

import base64
import json

import pytest
from google.protobuf import json_format

from micro.proto import config_pb2
from micro_cli.flags import (
    FlagError,
    UnknownFlag,
    body_flag,
    flag_specs,
    parse_flags,
    validate,
    value_choices,
)


@pytest.fixture(scope="module")
def order_type(kitchen_pb2):
    return kitchen_pb2.Order


def body(order_type, *args, stdin=""):
    return parse_flags(order_type.DESCRIPTOR, list(args)).body(lambda: stdin)


def parse(order_type, *args, stdin=""):
    data = body(order_type, *args, stdin=stdin)
    validate(order_type.DESCRIPTOR, data)
    return json_format.ParseDict(data, order_type())


def error(order_type, *args, stdin=""):
    with pytest.raises(FlagError) as raised:
        parse(order_type, *args, stdin=stdin)
    assert raised.value.exit_code == 2
    return str(raised.value)


# -- scalars ---------------------------------------------------------------------------------------


def test_every_scalar_type(order_type):
    order = parse(
        order_type,
        "--name=Alice",
        "--count=3",
        "--total=-9000000000",
        "--table=4294967295",
        "--ticket=18446744073709551615",
        "--delta=-2",
        "--price=1.25",
        "--weight=0.5",
        "--urgent",
        "--note=aGk=",
    )
    assert (order.name, order.count, order.total, order.table) == ("Alice", 3, -9000000000, 4294967295)
    assert (order.ticket, order.delta, order.price, order.weight) == (2**64 - 1, -2, 1.25, 0.5)
    assert order.urgent is True
    assert order.note == b"hi"


def test_values_may_follow_the_flag_after_a_space(order_type):
    order = parse(order_type, "--name", "Alice Smith", "--delta", "-5", "--count", "7")
    assert (order.name, order.delta, order.count) == ("Alice Smith", -5, 7)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--urgent"], True),
        (["--urgent=false"], False),
        (["--urgent=TRUE"], True),
        (["--urgent", "false"], False),
        (["--urgent", "--name=x"], True),
        (["--urgent=no"], False),
    ],
)
def test_bool_is_a_bare_flag_or_takes_true_or_false(order_type, args, expected):
    assert parse(order_type, *args).urgent is expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count=abc"], "--count: 'abc' is not an int32"),
        (["--count=2147483648"], "--count: 2147483648 is out of range for int32 (-2147483648 to 2147483647)"),
        (["--count=-2147483649"], "out of range for int32"),
        (["--table=-1"], "--table: -1 is out of range for uint32 (0 to 4294967295)"),
        (["--ticket=18446744073709551616"], "out of range for uint64"),
        (["--total=1.5"], "--total: '1.5' is not an int64"),
        (["--price=cheap"], "--price: 'cheap' is not a double"),
        (["--weight=1e39"], "--weight: 1e39 is out of range for float"),
        (["--urgent=maybe"], "--urgent: 'maybe' is not a bool"),
        (["--note=hello"], "--note: 'hello' is not base64"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_flag_and_the_type(order_type, args, message):
    assert message in error(order_type, *args)


def test_int32_bounds_are_accepted(order_type):
    assert parse(order_type, "--count=2147483647").count == 2**31 - 1
    assert parse(order_type, "--count=-2147483648").count == -(2**31)
    assert parse(order_type, "--count=0x10").count == 16


def test_non_finite_doubles(order_type):
    assert parse(order_type, "--price=inf").price == float("inf")
    assert parse(order_type, "--price=-inf").price == float("-inf")


def test_bytes_from_base64_urlsafe_base64_or_a_file(order_type, tmp_path):
    assert parse(order_type, "--note=_-8").note == b"\xff\xef"
    assert parse(order_type, "--note=aGk").note == b"hi"  # padding is optional
    (tmp_path / "blob").write_bytes(b"\x00\x01binary")
    assert parse(order_type, f"--note=@{tmp_path / 'blob'}").note == b"\x00\x01binary"
    assert "cannot read" in error(order_type, f"--note=@{tmp_path / 'absent'}")


# -- enums, repeated, maps -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["SMALL", "small", "Small", "1"])
def test_enums_by_name_in_any_case_or_by_number(order_type, kitchen_pb2, value):
    assert parse(order_type, f"--size={value}").size == kitchen_pb2.SMALL


def test_an_enum_name_may_leave_out_the_enum_prefix(order_type, kitchen_pb2):
    assert parse(order_type, "--size=unspecified").size == kitchen_pb2.SIZE_UNSPECIFIED


def test_an_unknown_enum_name_lists_the_names(order_type):
    assert error(order_type, "--size=HUGE") == (
        "--size: 'HUGE' is not a Size: use one of SIZE_UNSPECIFIED, SMALL, LARGE"
    )


def test_repeated_fields_take_repeated_flags_comma_lists_and_json_arrays(order_type, kitchen_pb2):
    order = parse(order_type, "--tags=a,b", "--tags", "c", "--seats=1", "--seats=2,3", "--sizes=small,LARGE")
    assert list(order.tags) == ["a", "b", "c"]
    assert list(order.seats) == [1, 2, 3]
    assert list(order.sizes) == [kitchen_pb2.SMALL, kitchen_pb2.LARGE]
    assert list(parse(order_type, '--tags=["x,y", "z"]').tags) == ["x,y", "z"]
    assert "--seats: 'x' is not an int32" in error(order_type, "--seats=1,x")


def test_repeated_messages_take_json_objects(order_type):
    order = parse(order_type, '--guests={"email": "a"}', '--guests=[{"email": "b"}, {"email": "c"}]')
    assert [g.email for g in order.guests] == ["a", "b", "c"]
    assert "is not JSON" in error(order_type, "--guests=email=a")


def test_maps_take_key_value_pairs_dotted_keys_or_json(order_type):
    order = parse(
        order_type,
        "--labels=env=prod",
        "--labels",
        "team=a=b",
        "--labels.tier=gold",
        '--labels={"zone": "eu"}',
        "--counts=x=5",
        "--counts.y=-1",
    )
    assert dict(order.labels) == {"env": "prod", "team": "a=b", "tier": "gold", "zone": "eu"}
    assert dict(order.counts) == {"x": 5, "y": -1}
    assert "--counts: 'many' is not an int64" in error(order_type, "--counts=x=many")
    assert "--labels: 'env' is not KEY=VALUE (nor a JSON object)" in error(order_type, "--labels=env")


# -- nested messages and oneofs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    [
        "--customer.address.geo.lat",
        "--customer_address_geo_lat",
        "--customer-address-geo-lat",
        "--customer.address_geo-lat",
        "--Customer.Address.Geo.Lat",
    ],
)
def test_nested_fields_at_any_depth_with_any_separator(order_type, flag):
    assert parse(order_type, f"{flag}=1.5").customer.address.geo.lat == 1.5


def test_nested_flags_merge_with_a_json_object_for_the_message(order_type):
    order = parse(
        order_type, '--customer={"email": "e", "address": {"city": "Oslo"}}', "--customer.address.geo.lng=2"
    )
    assert (order.customer.email, order.customer.address.city, order.customer.address.geo.lng) == (
        "e",
        "Oslo",
        2,
    )


def test_two_members_of_a_oneof_is_an_error_naming_both(order_type):
    assert (
        error(order_type, "--card=1", "--cash=2")
        == "--card and --cash are both in oneof payment: set only one"
    )
    assert parse(order_type, "--card=1", "--card=2").card == "2"  # the same member again: the last wins


# -- well-known types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2024-05-01T12:00:00Z", 1714564800),
        ("2024-05-01T14:00:00+02:00", 1714564800),
        ("2024-05-01 12:00:00", 1714564800),  # no zone: UTC
        ("2024-05-01", 1714521600),
    ],
)
def test_timestamps_are_rfc3339(order_type, text, seconds):
    assert parse(order_type, f"--placed={text}").placed.seconds == seconds


def test_timestamps_keep_nanoseconds(order_type):
    assert parse(order_type, "--placed=2024-05-01T12:00:00.123456789Z").placed.nanos == 123456789


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [("1.5s", 1, 500000000), ("90m", 5400, 0), ("1h30m", 5400, 0), ("250ms", 0, 250000000), ("-2s", -2, 0)],
)
def test_durations(order_type, text, seconds, nanos):
    wait = parse(order_type, f"--wait={text}").wait
    assert (wait.seconds, wait.nanos) == (seconds, nanos)


def test_struct_wrappers_and_optional_scalars(order_type):
    order = parse(order_type, '--extra={"a": [1, "x"], "b": {"c": null}}', "--comment=hi", "--priority=0")
    assert json_format.MessageToDict(order.extra) == {"a": [1, "x"], "b": {"c": None}}
    assert order.HasField("comment") and order.comment.value == "hi"
    assert order.HasField("priority") and order.priority == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--placed=yesterday"], "--placed: 'yesterday' is not an RFC 3339 time"),
        (["--wait=soon"], "--wait: 'soon' is not a duration"),
        (["--wait=999999999999s"], "--wait: '999999999999s' is out of range for a duration"),
        (["--extra=[1]"], "--extra: '[1]' is not a JSON object"),
        (["--extra={oops"], "--extra: '{oops' is not JSON"),
    ],
)
def test_bad_well_known_values(order_type, args, message):
    assert message in error(order_type, *args)


# -- --data ----------------------------------------------------------------------------------------


def test_data_is_the_body_and_flags_override_its_fields(order_type):
    data = json.dumps(
        {
            "name": "from data",
            "count": 1,
            "customer": {"email": "d", "address": {"city": "Rome"}},
            "card": "1",
        }
    )
    order = parse(order_type, f"--data={data}", "--count=2", "--customer.email=f", "--cash=5")
    assert (order.name, order.count) == ("from data", 2)
    assert (order.customer.email, order.customer.address.city) == ("f", "Rome")
    assert order.WhichOneof("payment") == "cash"  # the flag's member replaces the data's


def test_data_in_json_names_is_overridden_too(order_type):
    order = parse(order_type, '--data={"customer": {"email": "d"}, "total": 1}', "--customer.email=f")
    assert order.customer.email == "f"


def test_data_from_stdin_and_from_a_file(order_type, tmp_path):
    assert parse(order_type, "--data", "-", "--count=4", stdin='{"name": "in"}').name == "in"
    (tmp_path / "order.json").write_text('{"name": "file"}')
    assert parse(order_type, f"--data=@{tmp_path / 'order.json'}").name == "file"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data={name: x}"], "--data is not JSON"),
        (["--data=[1]"], "--data must be a JSON object, not list"),
        (['--data={"kee": 1}'], "kitchen.Order has no field 'kee'"),
        (['--data={"nmae": 1}'], "kitchen.Order has no field 'nmae'; did you mean 'name'?"),
        (['--data={"count": "many"}'], "does not fit kitchen.Order"),
    ],
)
def test_bad_data(order_type, args, message):
    assert message in error(order_type, *args)


def test_the_body_flag_gives_way_to_a_field_named_data():
    value = config_pb2.Value.DESCRIPTOR
    assert body_flag(value) == "json"
    parsed = parse_flags(value, ["--data=x", '--json={"format": "json"}'])
    assert parsed.body(lambda: "") == {"format": "json", "data": "x"}


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "suggestion"),
    [
        ("--nmae", "--name"),
        ("--customer.emial", "--customer.email"),
        ("--lables", "--labels"),
        ("--dta", "--data"),
    ],
)
def test_an_unknown_flag_suggests_the_closest(order_type, flag, suggestion):
    with pytest.raises(UnknownFlag) as raised:
        parse_flags(order_type.DESCRIPTOR, [f"{flag}=x"])
    assert str(raised.value) == f"unknown flag {flag}; did you mean {suggestion}?"


def test_an_unknown_flag_without_a_close_one(order_type):
    assert error(order_type, "--zzzzzz=1") == "unknown flag --zzzzzz"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stray"], "unexpected argument 'stray'"),
        (["-n", "x"], "unexpected argument '-n'"),
        (["--count"], "--count needs a value (int32)"),
        (["--labels", "--name=x"], "--labels needs a value (key=value)"),
    ],
)
def test_malformed_command_lines(order_type, args, message):
    assert message in error(order_type, *args)


def test_help_flags_are_left_to_the_caller(order_type):
    assert parse_flags(order_type.DESCRIPTOR, ["--name=x", "--help", "-h"]).body(str) == {"name": "x"}


def test_flag_specs_describe_every_leaf(order_type, kitchen_pb2):
    specs = {s.name: s for s in flag_specs(order_type.DESCRIPTOR, {"kitchen.Order.name": "the name"})}
    assert (specs["name"].type, specs["name"].help) == ("string", "the name")
    assert specs["customer.address.geo.lat"].type == "double"
    assert specs["tags"].markers == ("repeated",)
    assert (specs["labels"].type, specs["labels"].markers) == ("key=value", ("map",))
    assert specs["counts"].type == "key=int64"
    assert specs["card"].markers == ("oneof payment",)
    assert "priority" in specs and specs["priority"].markers == ()  # proto3 optional is no oneof
    assert (specs["placed"].type, specs["wait"].type, specs["extra"].type) == (
        "timestamp",
        "duration",
        "JSON",
    )
    assert specs["comment"].type == "string"
    assert specs["size"].help == "one of SIZE_UNSPECIFIED, SMALL, LARGE"
    assert "customer" not in specs and "guests" in specs


def test_value_choices(order_type):
    assert value_choices(order_type.DESCRIPTOR, "size") == ["SIZE_UNSPECIFIED", "SMALL", "LARGE"]
    assert value_choices(order_type.DESCRIPTOR, "urgent") == ["true", "false"]
    assert value_choices(order_type.DESCRIPTOR, "name") == []


def test_the_body_is_plain_json(order_type):
    data = body(order_type, "--note=aGk=", "--total=5", "--price=nan")
    assert json.loads(json.dumps(data)) == {
        "note": base64.b64encode(b"hi").decode(),
        "total": 5,
        "price": "NaN",
    }
