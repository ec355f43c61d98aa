"""Property: any ``kitchen.Order`` written as flags parses back to the same message.

A small generator turns a message into a command line (choosing among the
spellings a user may type); the flag parser builds the JSON body, which
``json_format`` reads back into an ``Order`` that must equal the original.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micro_cli.flags import parse_flags, validate

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=12)
KEYS = st.text(max_size=8).filter(lambda k: "=" not in k)
DOUBLES = st.floats(allow_nan=False)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALARS = st.none() | st.booleans() | FINITE | TEXT


@st.composite
def orders(draw: Any, pb: Any) -> Any:
    order = pb.Order(
        name=draw(TEXT),
        count=draw(INT32),
        total=draw(INT64),
        table=draw(st.integers(0, 2**32 - 1)),
        ticket=draw(st.integers(0, 2**64 - 1)),
        delta=draw(INT32),
        price=draw(DOUBLES),
        weight=draw(st.floats(width=32, allow_nan=False)),
        urgent=draw(st.booleans()),
        note=draw(st.binary(max_size=12)),
        size=draw(st.sampled_from([0, 1, 2])),
        tags=draw(st.lists(TEXT, max_size=3)),
        seats=draw(st.lists(INT32, max_size=3)),
        labels=draw(st.dictionaries(KEYS, TEXT, max_size=3)),
        counts=draw(st.dictionaries(KEYS, INT64, max_size=3)),
        sizes=draw(st.lists(st.sampled_from([0, 1, 2]), max_size=3)),
    )
    if draw(st.booleans()):
        order.customer.email = draw(TEXT)
        if draw(st.booleans()):
            order.customer.address.city = draw(TEXT)
            if draw(st.booleans()):
                order.customer.address.geo.lat = draw(FINITE)
                order.customer.address.geo.lng = draw(FINITE)
    for email in draw(st.lists(TEXT, max_size=2)):
        order.guests.add(email=email)
    payment = draw(st.sampled_from(["", "card", "cash"]))
    if payment:
        setattr(order, payment, draw(TEXT))
    if draw(st.booleans()):
        order.placed.seconds = draw(st.integers(-62135596800, 253402300799))
        order.placed.nanos = draw(st.integers(0, 999_999_999))
    if draw(st.booleans()):
        seconds = draw(st.integers(-(10**11), 10**11))
        nanos = draw(st.integers(0, 999_999_999))
        order.wait.seconds, order.wait.nanos = seconds, -nanos if seconds < 0 else nanos
    if draw(st.booleans()):
        order.extra.update(draw(st.dictionaries(TEXT, JSON_SCALARS, max_size=3)))
    if draw(st.booleans()):
        order.comment.value = draw(TEXT)
    if draw(st.booleans()):
        order.priority = draw(INT32)
    return order


def to_argv(order: Any, sep: str, spaced: bool, dotted_keys: bool) -> list[str]:
    """A command line for ``order``: the flags a user could type to send it."""
    argv: list[str] = []

    def flag(name: str, value: str) -> None:
        if spaced and not value.startswith("-"):
            argv.extend([f"--{name}", value])
        else:
            argv.append(f"--{name}={value}")

    for name in ("name", "count", "total", "table", "ticket", "delta"):
        flag(name, str(getattr(order, name)))
    flag("price", repr(order.price))
    flag("weight", repr(order.weight))
    argv.append("--urgent" if order.urgent else "--urgent=false")
    flag("note", base64.b64encode(order.note).decode())
    flag("size", order.DESCRIPTOR.fields_by_name["size"].enum_type.values[order.size].name.lower())
    if any("," in t or t.lstrip().startswith("[") for t in order.tags):
        flag("tags", json.dumps(list(order.tags)))
    else:
        for tag in order.tags:
            flag("tags", tag)
    if order.seats:
        flag("seats", ",".join(str(s) for s in order.seats))
    for field in ("labels", "counts"):
        for key, value in getattr(order, field).items():
            if dotted_keys:
                argv.append(f"--{field}.{key}={value}")
            else:
                flag(field, f"{key}={value}")
    if order.HasField("customer"):
        flag("customer.email", order.customer.email)
        if order.customer.HasField("address"):
            flag(f"customer{sep}address{sep}city", order.customer.address.city)
            if order.customer.address.HasField("geo"):
                flag(f"customer{sep}address{sep}geo{sep}lat", repr(order.customer.address.geo.lat))
                flag(f"customer{sep}address{sep}geo{sep}lng", repr(order.customer.address.geo.lng))
    for guest in order.guests:
        flag("guests", json.dumps(json_format.MessageToDict(guest)))
    if order.WhichOneof("payment"):
        flag(order.WhichOneof("payment"), getattr(order, order.WhichOneof("payment")))
    if order.HasField("placed"):
        flag("placed", order.placed.ToJsonString())
    if order.HasField("wait"):
        flag("wait", order.wait.ToJsonString())
    if order.HasField("extra"):
        flag("extra", json.dumps(json_format.MessageToDict(order.extra)))
    if order.HasField("comment"):
        flag("comment", order.comment.value)
    if order.sizes:
        names = order.DESCRIPTOR.fields_by_name["sizes"].enum_type.values
        flag("sizes", ",".join(names[s].name for s in order.sizes))
    if order.HasField("priority"):
        flag("priority", str(order.priority))
    return argv


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_order_survives_flags_to_json_to_proto(kitchen_pb2, data):
    order = data.draw(orders(kitchen_pb2))
    sep = data.draw(st.sampled_from([".", "_", "-"]))
    argv = to_argv(order, sep, spaced=data.draw(st.booleans()), dotted_keys=data.draw(st.booleans()))
    body = parse_flags(order.DESCRIPTOR, argv).body(lambda: "")
    validate(order.DESCRIPTOR, body)
    parsed = json_format.ParseDict(json.loads(json.dumps(body)), kitchen_pb2.Order())
    assert parsed == order, argv
