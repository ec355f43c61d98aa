"""Parsing durations such as ``90s``, ``5m``, ``1h30m`` or ``1.5h`` (Go's syntax, plus ``d``)."""

from __future__ import annotations

import re

from micro_cli.errors import UsageError

__all__ = ["parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds in ``text``; a bare number means seconds. ``UsageError`` says the expected form."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"invalid {what} {text!r}: use a number with a unit, e.g. 90s, 5m, 1h30m or 2d")
    return sum(float(n) * _UNITS[u] for n, u in parts)
