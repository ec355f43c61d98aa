"""Which namespace a building-block request acts on, and whether the caller may.

A request may name a namespace (a store database, a config tree, a runtime
namespace); when it names none it acts on the caller's. Either way the
caller's account must be allowed there (``micro_daemon.auth.gate.require``):
an account of that namespace, or an administrator of ``micro``.
"""

from __future__ import annotations

from micro.context import Context, validate_namespace
from micro_daemon.auth.gate import require

__all__ = ["target_namespace"]


def target_namespace(requested: str, context: Context, *, what: str) -> str:
    """``requested`` (validated) or the caller's namespace; refused naming ``what`` if not allowed."""
    namespace = validate_namespace(requested) if requested else context.namespace
    require(context, namespace, what=what)
    return namespace
