from __future__ import annotations

import pytest

from micro.auth import Account
from micro.errors import BadRequest, Forbidden, InternalServerError, NotFound, Unauthorized
from micro_daemon.auth.rules import DEFAULT_RULE, Access, Decision, Resource, Rule, RuleStore, verify
from micro_daemon.auth.tokens import DATABASE, TABLE
from micro_daemon.store.backend import Record

from .conftest import Clock


def rule(id: str, scope: str, resource: str = "*:*:*", access: str = "granted", priority: int = 0) -> Rule:
    return Rule(id, scope, Resource.parse(resource), Access(access), priority)


ALICE = Account("alice", "user", "ns", ("dev",))
ROOT = Account("root", "user", "ns", ("admin",))
STRANGER = Account("eve", "user", "other", ("dev", "admin"))
STORE_READ = "service:store:Store.Read"

# (rules, account, resource, namespace 'ns') -> (granted, deciding rule, code)
TABLE_OF_CASES = {
    "public grant, anonymous": ([rule("p", "")], None, STORE_READ, (True, "p", 200)),
    "public grant, account of another namespace": ([rule("p", "")], STRANGER, STORE_READ, (True, "p", 200)),
    "public deny, anonymous": ([rule("p", "", access="denied")], None, STORE_READ, (False, "p", 403)),
    "public deny, account": ([rule("p", "", access="denied")], ALICE, STORE_READ, (False, "p", 403)),
    "* skips anonymous": ([rule("any", "*")], None, STORE_READ, (False, None, 401)),
    "* grants any account of the namespace": ([rule("any", "*")], ROOT, STORE_READ, (True, "any", 200)),
    "* refuses another namespace": ([rule("any", "*")], STRANGER, STORE_READ, (False, "any", 403)),
    "+ skips anonymous": ([rule("all", "+")], None, STORE_READ, (False, None, 401)),
    "+ grants any account": ([rule("all", "+")], STRANGER, STORE_READ, (True, "all", 200)),
    "+ deny": ([rule("all", "+", access="denied")], ALICE, STORE_READ, (False, "all", 403)),
    "scope match": ([rule("devs", "dev")], ALICE, STORE_READ, (True, "devs", 200)),
    "scope match is case-insensitive": ([rule("devs", "DEV")], ALICE, STORE_READ, (True, "devs", 200)),
    "scope missing": ([rule("admins", "admin")], ALICE, STORE_READ, (False, None, 403)),
    "scope of another namespace": ([rule("devs", "dev")], STRANGER, STORE_READ, (False, "devs", 403)),
    "higher priority deny first": (
        [rule("g", "dev"), rule("d", "dev", access="denied", priority=1)],
        ALICE,
        STORE_READ,
        (False, "d", 403),
    ),
    "higher priority grant first": (
        [rule("d", "dev", access="denied"), rule("g", "dev", priority=1)],
        ALICE,
        STORE_READ,
        (True, "g", 200),
    ),
    "a higher rule that does not apply is passed over": (
        [rule("g", "dev"), rule("d", "admin", access="denied", priority=9)],
        ALICE,
        STORE_READ,
        (True, "g", 200),
    ),
    "deny wins at equal priority, grant listed first": (
        [rule("g", "*"), rule("d", "dev", access="denied")],
        ALICE,
        STORE_READ,
        (False, "d", 403),
    ),
    "deny wins at equal priority, deny listed first": (
        [rule("d", "dev", access="denied"), rule("g", "*")],
        ALICE,
        STORE_READ,
        (False, "d", 403),
    ),
    "an equal-priority deny that does not apply": (
        [rule("g", "*"), rule("d", "admin", access="denied")],
        ALICE,
        STORE_READ,
        (True, "g", 200),
    ),
    "type must match": ([rule("r", "", "web:store:*")], None, STORE_READ, (False, None, 401)),
    "name must match": ([rule("r", "", "service:config:*")], None, STORE_READ, (False, None, 401)),
    "endpoint must match": (
        [rule("r", "", "service:store:Store.Write")],
        None,
        STORE_READ,
        (False, None, 401),
    ),
    "exact match, any case": (
        [rule("r", "", "Service:STORE:store.read")],
        None,
        STORE_READ,
        (True, "r", 200),
    ),
    "no rules, anonymous": ([], None, STORE_READ, (False, None, 401)),
    "no rules, account": ([], ALICE, STORE_READ, (False, None, 403)),
    "the default rule opens everything": ([DEFAULT_RULE], None, STORE_READ, (True, "default", 200)),
}


@pytest.mark.parametrize(
    ("rules", "account", "resource", "expected"), TABLE_OF_CASES.values(), ids=TABLE_OF_CASES.keys()
)
def test_rule_evaluation(rules, account, resource, expected):
    decision = verify(rules, account, Resource.parse(resource), "ns")
    assert (decision.granted, decision.rule.id if decision.rule else None, decision.code) == expected
    assert decision.reason


@pytest.mark.parametrize(
    ("pattern", "covered"),
    [
        ("/*", True),
        ("/foo/*", True),
        ("/foo/bar/*", True),
        ("/foo/bar/baz/*", True),  # as Micro: the path itself as a prefix
        ("/FOO/*", True),
        ("/foo/bar/baz", True),
        ("/foo", False),
        ("/foo/ba*", False),
        ("/other/*", False),
        ("/foo/bar/baz/qux/*", False),
    ],
)
def test_path_endpoints_match_every_prefix_wildcard(pattern, covered):
    decision = verify(
        [rule("r", "", f"web:site:{pattern}")], None, Resource("web", "site", "/foo/bar/baz"), "ns"
    )
    assert decision.granted is covered


def test_the_issuer_reason_names_both_namespaces():
    decision = verify([rule("devs", "dev")], STRANGER, Resource.parse(STORE_READ), "ns")
    assert "'ns'" in decision.reason and "'other'" in decision.reason


def test_a_decision_raises_401_or_403():
    Decision(True, None, "ok").raise_if_denied()
    with pytest.raises(Unauthorized, match="sign in"):
        verify([], None, Resource.parse(STORE_READ), "ns").raise_if_denied()
    with pytest.raises(Forbidden) as info:
        verify([], ALICE, Resource.parse(STORE_READ), "ns").raise_if_denied()
    assert info.value.id == "auth"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "service",
        "service:store",
        "service::Store.Read",
        ":store:*",
        "service:store:",
        "service:st ore:*",
        "a:b:c d",
        "a\tb:c:d",
    ],
)
def test_malformed_resources_are_refused(text):
    with pytest.raises(BadRequest, match="type:name:endpoint"):
        Resource.parse(text)


def test_an_endpoint_may_hold_colons():
    assert Resource.parse("web:site:/a:b") == Resource("web", "site", "/a:b")


@pytest.mark.parametrize(
    "bad",
    [
        rule("has space", ""),
        rule("../up", ""),
        Rule("r", "two words", Resource("*", "*", "*"), Access.GRANTED),
        Rule("r", "", Resource("*", "", "*"), Access.GRANTED),
        Rule("r", "", Resource("*", "*", "*"), Access.GRANTED, 2**31),
    ],
)
def test_invalid_rules_are_refused(bad):
    with pytest.raises(BadRequest):
        bad.check()


@pytest.fixture
def clock():
    return Clock(0.0)


@pytest.fixture
def rules(store, clock):
    return RuleStore(store, clock=clock)


async def test_the_default_rule_is_written_when_a_namespace_is_first_read(rules, store):
    assert await rules.list("ns") == [DEFAULT_RULE]
    assert (await store.get(DATABASE, TABLE, "rules/ns/default")).value


async def test_a_namespace_whose_rules_were_all_deleted_stays_closed_after_a_restart(rules, store):
    await rules.list("ns")
    await rules.delete("ns", "default")
    assert await rules.list("ns") == []
    assert await RuleStore(store).list("ns") == []


async def test_a_rule_created_before_the_first_read_keeps_the_default_out(rules):
    await rules.create("ns", rule("devs", "dev"))
    assert [r.id for r in await rules.list("ns")] == ["devs"]


async def test_rules_are_replaced_by_id_and_kept_per_namespace(rules):
    await rules.create("ns", rule("r", "dev"))
    await rules.create("ns", rule("r", "ops", "service:store:*", "denied", 3))
    await rules.create("other", rule("x", ""))
    assert await rules.list("ns") == [rule("r", "ops", "service:store:*", "denied", 3)]
    assert [r.id for r in await rules.list("other")] == ["x"]
    with pytest.raises(NotFound, match="no rule 'x' in namespace 'ns'"):
        await rules.delete("ns", "x")


async def test_lists_are_cached_and_local_writes_clear_the_cache(rules, store, clock):
    await rules.create("ns", rule("a", ""))
    assert len(await rules.list("ns")) == 1
    other_process = RuleStore(store)
    await other_process.create("ns", rule("b", ""))
    assert len(await rules.list("ns")) == 1  # cached
    clock.advance(5)
    assert len(await rules.list("ns")) == 2
    await rules.delete("ns", "a")
    assert [r.id for r in await rules.list("ns")] == ["b"]


async def test_a_corrupt_rule_record_is_reported(rules, store):
    await store.put(DATABASE, TABLE, Record(key="rules/ns/bad", value=b"{"))
    with pytest.raises(InternalServerError, match="rules/ns/bad"):
        await rules.list("ns")
