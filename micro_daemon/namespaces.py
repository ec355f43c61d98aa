"""Which namespace a building-block request acts on.

A request may name a namespace (a store database, a config tree, a runtime
namespace); when it names none it acts on the caller's. Only callers in the
``micro`` namespace may act on another one (the identity issue narrows this
to ``micro`` admins and service accounts).
"""

from __future__ import annotations

from micro.context import DEFAULT_NAMESPACE, Context, validate_namespace
from micro.errors import Forbidden

__all__ = ["target_namespace"]


def target_namespace(requested: str, context: Context, *, what: str) -> str:
    """``requested`` (validated) or the caller's namespace; ``Forbidden`` naming ``what`` if not allowed."""
    namespace = validate_namespace(requested) if requested else context.namespace
    if namespace != context.namespace and context.namespace != DEFAULT_NAMESPACE:
        raise Forbidden(f"namespace {context.namespace!r} may not use {what} of namespace {namespace!r}")
    return namespace
