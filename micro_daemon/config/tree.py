"""Pure functions over a config tree: dotted paths, merge-on-set and secret leaves.

A tree is a JSON object whose nodes are branches (objects of child nodes) or
leaves. As in Micro, every leaf is ``{"value", "leaf": true, "secret"}``::

    {"db": {"host": {"value": "localhost", "leaf": true, "secret": false},
            "password": {"value": "<base64 AES-GCM>", "leaf": true, "secret": true}}}

Unlike Micro, ``value`` holds the JSON value itself rather than its JSON text;
for a secret leaf it holds the ciphertext of that JSON text. A branch never
has ``"leaf": true`` (its children are objects), so the two can't be confused,
even under a user key named ``leaf``. The root is always a branch.

No function mutates the tree it is given: writers return a new one.
"""

from __future__ import annotations

import copy
import json
from typing import Any, NoReturn, Protocol

from micro.errors import BadRequest, NotFound

__all__ = [
    "SECRET_MASK",
    "Cipher",
    "Tree",
    "delete",
    "get",
    "overlaps",
    "parse_value",
    "set",
    "split_path",
    "validate",
]

Tree = dict[str, Any]

SECRET_MASK = "[secret]"


class Cipher(Protocol):
    """Encrypts the JSON text of secret leaves (``SecretBox`` is the implementation).

    ``decrypt`` must raise a ``MicroError`` when the token was altered.
    """

    def encrypt(self, plaintext: str) -> str: ...

    def decrypt(self, token: str) -> str: ...


def split_path(path: str) -> list[str]:
    """The keys of a dotted path (``"db.host"`` -> ``["db", "host"]``; ``""``, the whole tree -> ``[]``).

    Raises ``BadRequest`` for an empty key, as in ``a..b``, ``.a`` or ``a.``.
    """
    if path == "":
        return []
    keys = path.split(".")
    if "" in keys:
        raise BadRequest(
            f"config path {path!r} is malformed: it has an empty key; use non-empty keys "
            "separated by single dots, like 'db.host', or '' for the whole tree",
            id="config",
        )
    return keys


def overlaps(path: str, other: str) -> bool:
    """Whether ``path`` is ``other``, one of its ancestors or one of its descendants."""
    keys, other_keys = split_path(path), split_path(other)
    common = min(len(keys), len(other_keys))
    return keys[:common] == other_keys[:common]


def parse_value(text: str) -> Any:
    """Parse a value typed by a user: JSON if it is JSON, else the text itself.

    ``"5"`` -> ``5``, ``"true"`` -> ``True``, ``'{"a":1}'`` -> ``{"a": 1}``,
    ``"hello"`` -> ``"hello"``. ``NaN`` and ``Infinity`` stay text: they are not JSON.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def get(tree: Tree, path: str, *, reveal: bool = False, cipher: Cipher | None = None) -> Any:
    """The plain JSON value at ``path``: a leaf's value, or an object built from a branch.

    Secret leaves read as ``"[secret]"``, or decrypted with ``cipher`` when
    ``reveal``. Raises ``NotFound`` if nothing is at ``path``.
    """
    node = _find(tree, split_path(path))
    if node is None:
        _raise_not_found(path)
    if reveal and cipher is None:
        raise ValueError("revealing secrets needs a cipher")
    return _plain(node, cipher if reveal else None)


def set(  # noqa: A001  # tree.set reads as the config operation it is
    tree: Tree, path: str, value: Any, *, secret: bool = False, cipher: Cipher | None = None
) -> Tree:
    """A new tree with ``value`` set at ``path``.

    An object is merged leaf by leaf into what is there (an empty object adds
    nothing to an existing object). Any other value, lists included, replaces
    the node at ``path``; a leaf on the way is replaced by an object. With
    ``secret``, every leaf set is encrypted with ``cipher``. The whole tree
    (``""``) can only be given an object.
    """
    keys = split_path(path)
    if not keys and not isinstance(value, dict):
        raise BadRequest(
            f"the whole config tree can only be set to a JSON object, not {type(value).__name__}; "
            "give a path such as 'db.host' to set a single value",
            id="config",
        )
    if secret and cipher is None:
        raise ValueError("setting a secret needs a cipher")
    updated = copy.deepcopy(tree)
    _merge(updated, keys, value, _LeafMaker(secret, cipher))
    return updated


def delete(tree: Tree, path: str) -> Tree:
    """A new tree without the node at ``path`` (``""``: everything).

    Objects left empty by the removal are removed too. Raises ``NotFound`` if
    nothing is at ``path``.
    """
    keys = split_path(path)
    if not keys:
        return {}
    if _find(tree, keys) is None:
        _raise_not_found(path)
    updated = copy.deepcopy(tree)
    _remove(updated, keys)
    return updated


def validate(tree: object) -> Tree:
    """``tree`` if it is a well-formed config tree (e.g. parsed from storage); else ``ValueError``."""
    if not isinstance(tree, dict) or _is_leaf(tree):
        raise ValueError("the root is not an object of config keys")
    for key, child in tree.items():
        _validate_node(child, [key])
    return tree


class _LeafMaker:
    def __init__(self, secret: bool, cipher: Cipher | None) -> None:
        self.secret = secret
        self.cipher = cipher

    def __call__(self, value: Any) -> Tree:
        stored = copy.deepcopy(value)
        if self.secret and self.cipher is not None:
            stored = self.cipher.encrypt(json.dumps(value))
        return {"value": stored, "leaf": True, "secret": self.secret}


def _merge(root: Tree, keys: list[str], value: Any, make_leaf: _LeafMaker) -> None:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _merge(root, [*keys, _checked_key(key, keys)], child, make_leaf)
    elif isinstance(value, dict) and _is_branch(_find(root, keys)):
        return
    else:
        _place(root, keys, make_leaf(value))


def _place(root: Tree, keys: list[str], leaf: Tree) -> None:
    node = root
    for key in keys[:-1]:
        child = node.get(key)
        if child is None or _is_leaf(child):
            child = node[key] = {}
        node = child
    node[keys[-1]] = leaf


def _remove(node: Tree, keys: list[str]) -> None:
    head, rest = keys[0], keys[1:]
    if rest:
        child = node[head]
        _remove(child, rest)
        if child:
            return
    del node[head]


def _find(tree: Tree, keys: list[str]) -> Tree | None:
    node = tree
    for key in keys:
        if _is_leaf(node) or key not in node:
            return None
        node = node[key]
    return node


def _plain(node: Tree, cipher: Cipher | None) -> Any:
    if not _is_leaf(node):
        return {key: _plain(child, cipher) for key, child in node.items()}
    if not node["secret"]:
        return copy.deepcopy(node["value"])
    if cipher is None:
        return SECRET_MASK
    return json.loads(cipher.decrypt(node["value"]))


def _checked_key(key: object, parent: list[str]) -> str:
    if isinstance(key, str) and key and "." not in key:
        return key
    where = ".".join(parent) or "the root"
    raise BadRequest(
        f"config key {key!r} under {where} is not allowed: keys are non-empty strings without '.'; "
        "nest objects instead of using dotted keys",
        id="config",
    )


def _validate_node(node: object, keys: list[str]) -> None:
    where = ".".join(keys)
    if not isinstance(node, dict):
        raise ValueError(f"node {where!r} is not an object")
    if not _is_leaf(node):
        for key, child in node.items():
            _validate_node(child, [*keys, key])
    elif "value" not in node or not isinstance(node.get("secret"), bool):
        raise ValueError(f"leaf {where!r} lacks a 'value' or a boolean 'secret'")
    elif node["secret"] and not isinstance(node["value"], str):
        raise ValueError(f"secret leaf {where!r} does not hold ciphertext")


def _is_leaf(node: Tree) -> bool:
    return node.get("leaf") is True


def _is_branch(node: Tree | None) -> bool:
    return node is not None and not _is_leaf(node)


def _raise_not_found(path: str) -> NoReturn:
    raise NotFound(f"config path {path!r} not found", id="config")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")
