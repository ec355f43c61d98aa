from __future__ import annotations

import copy
import json

import pytest

from micro.errors import BadRequest, NotFound
from micro_daemon.config import tree
from micro_daemon.config.secrets import SecretBox

BAD_PATHS = ["a..b", ".a", "a.", ".", ".."]


def build(value: object, **kwargs: object) -> tree.Tree:
    return tree.set({}, "", value, **kwargs)  # type: ignore[arg-type]


def test_objects_merge_leaf_by_leaf():
    config = build({"a": 1, "b": {"b1": 2}, "c": 3})
    config = tree.set(config, "", {"d": 4, "b": {"b2": 2.2}})
    assert tree.get(config, "") == {"a": 1, "b": {"b1": 2, "b2": 2.2}, "c": 3, "d": 4}


def test_leaves_are_stored_with_their_secret_flag():
    assert tree.set({}, "db.port", 5432) == {"db": {"port": {"value": 5432, "leaf": True, "secret": False}}}


@pytest.mark.parametrize("value", [5, "text", None, False, [1, {"x": 2}]])
def test_a_non_object_replaces_an_object(value):
    config = tree.set(build({"a": {"b": 1, "c": 2}}), "a", value)
    assert tree.get(config, "a") == value
    assert tree.get(config, "") == {"a": value}


def test_a_list_replaces_a_list_whole():
    config = tree.set(build({"a": [1, 2, 3]}), "a", [4])
    assert tree.get(config, "a") == [4]


def test_setting_below_a_scalar_turns_it_into_an_object():
    config = tree.set(build({"a": 1}), "a.b.c", True)
    assert tree.get(config, "") == {"a": {"b": {"c": True}}}


def test_an_empty_object_adds_nothing_to_an_object():
    config = tree.set(build({"a": {"b": 1}}), "a", {})
    assert tree.get(config, "a") == {"b": 1}


def test_an_empty_object_is_kept_where_there_was_no_object():
    config = tree.set(build({"a": 1}), "a", {})
    assert tree.get(config, "") == {"a": {}}
    assert tree.get(tree.set(config, "a.b", 2), "") == {"a": {"b": 2}}


def test_a_key_named_leaf_is_ordinary_data():
    config = build({"x": {"leaf": True, "value": 1, "secret": False}})
    assert tree.get(config, "x") == {"leaf": True, "value": 1, "secret": False}
    assert tree.validate(json.loads(json.dumps(config))) == config


@pytest.mark.parametrize("value", [1, "x", [1], None])
def test_the_whole_tree_only_takes_an_object(value):
    with pytest.raises(BadRequest, match="whole config tree") as info:
        tree.set({}, "", value)
    assert info.value.id == "config"


@pytest.mark.parametrize("key", ["a.b", ""])
def test_keys_inside_an_object_value_must_be_plain(key):
    with pytest.raises(BadRequest, match="nest objects"):
        tree.set({}, "x", {"ok": 1, "sub": {key: 1}})


def test_writers_leave_their_input_alone():
    config = build({"a": {"b": 1}, "l": [1]})
    before = copy.deepcopy(config)
    tree.set(config, "a.c", 2)
    tree.set(config, "a", 3)
    tree.delete(config, "a.b")
    assert config == before


def test_get_returns_copies():
    config = build({"l": [1]})
    tree.get(config, "l").append(2)
    assert tree.get(config, "l") == [1]


def test_get_of_an_empty_tree_is_an_empty_object():
    assert tree.get({}, "") == {}


@pytest.mark.parametrize("path", ["x", "a.x", "a.b.c", "a.b.c.d"])
def test_get_of_a_missing_path_is_not_found(path):
    with pytest.raises(NotFound) as info:
        tree.get(build({"a": {"b": 1}}), path)
    assert info.value.detail == f"config path {path!r} not found"
    assert info.value.id == "config"


def test_delete_removes_a_subtree_and_empty_parents():
    config = build({"a": {"b": {"c": 1}}, "d": {"e": 1, "f": 2}})
    config = tree.delete(config, "a.b.c")
    config = tree.delete(config, "d.e")
    assert tree.get(config, "") == {"d": {"f": 2}}
    assert config == {"d": {"f": {"value": 2, "leaf": True, "secret": False}}}


def test_delete_of_everything():
    assert tree.delete(build({"a": 1}), "") == {}


@pytest.mark.parametrize("path", ["x", "a.b.c", "a.x"])
def test_delete_of_a_missing_path_is_not_found(path):
    with pytest.raises(NotFound, match=f"config path '{path}' not found"):
        tree.delete(build({"a": {"b": 1}}), path)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_malformed_paths_are_bad_requests(path):
    for call in (
        lambda: tree.get({}, path),
        lambda: tree.set({}, path, 1),
        lambda: tree.delete({}, path),
        lambda: tree.split_path(path),
    ):
        with pytest.raises(BadRequest, match="malformed") as info:
            call()
        assert info.value.id == "config"


def test_split_path():
    assert tree.split_path("") == []
    assert tree.split_path("db.host") == ["db", "host"]


@pytest.mark.parametrize(
    ("path", "other", "expected"),
    [
        ("a.b", "a.b", True),
        ("a", "a.b", True),
        ("a.b.c", "a.b", True),
        ("", "a.b", True),
        ("a.c", "a.b", False),
        ("ab", "a", False),
        ("a.bc", "a.b", False),
    ],
)
def test_overlaps(path, other, expected):
    assert tree.overlaps(path, other) is expected
    assert tree.overlaps(other, path) is expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("2.5", 2.5),
        ("hello", "hello"),
        ('{"a":1}', {"a": 1}),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('"quoted"', "quoted"),
        ("", ""),
        ("{broken", "{broken"),
        ("NaN", "NaN"),
        ("-Infinity", "-Infinity"),
    ],
)
def test_parse_value(text, value):
    assert tree.parse_value(text) == value


class TestSecrets:
    box = SecretBox.generate()

    def test_secrets_are_masked_unless_revealed(self):
        config = tree.set(
            build({"user": "admin"}), "password", {"v": "hunter2"}, secret=True, cipher=self.box
        )
        assert tree.get(config, "") == {"user": "admin", "password": {"v": "[secret]"}}
        assert tree.get(config, "password.v", reveal=True, cipher=self.box) == "hunter2"
        assert tree.get(config, "", reveal=True, cipher=self.box) == {
            "user": "admin",
            "password": {"v": "hunter2"},
        }

    def test_secret_leaves_hold_ciphertext(self):
        config = tree.set({}, "token", "hunter2", secret=True, cipher=self.box)
        leaf = config["token"]
        assert leaf["secret"] is True
        assert "hunter2" not in json.dumps(config)
        assert self.box.decrypt(leaf["value"]) == '"hunter2"'

    def test_a_plain_set_replaces_a_secret(self):
        config = tree.set({}, "token", "hunter2", secret=True, cipher=self.box)
        assert tree.get(tree.set(config, "token", "open"), "token") == "open"

    def test_a_cipher_is_required(self):
        with pytest.raises(ValueError, match="cipher"):
            tree.set({}, "a", 1, secret=True)
        with pytest.raises(ValueError, match="cipher"):
            tree.get({}, "", reveal=True)


@pytest.mark.parametrize(
    "stored",
    [
        [],
        "x",
        {"leaf": True, "value": 1, "secret": False},
        {"a": 1},
        {"a": {"leaf": True, "secret": False}},
        {"a": {"leaf": True, "value": 1}},
        {"a": {"b": {"leaf": True, "value": 1, "secret": True}}},
    ],
)
def test_validate_rejects_malformed_trees(stored):
    with pytest.raises(ValueError):
        tree.validate(stored)
