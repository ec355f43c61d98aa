"""Read-side JetStream calls of the events backend: searches, listings and range reads over a ``Link``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from nats.aio.msg import Msg

from micro_daemon.events.jetstream_wire import Delivery, Link, Stored, status

__all__ = ["gather_map", "lower_bound", "pages", "read_range", "subject_counts"]

T = TypeVar("T")
U = TypeVar("U")


async def gather_map(function: Callable[[T], Awaitable[U]], items: Iterable[T], size: int = 500) -> list[U]:
    """``function`` over ``items``, ``size`` calls at a time; the results in order."""
    todo, results = list(items), []
    for start in range(0, len(todo), size):
        results += await asyncio.gather(*(function(item) for item in todo[start : start + size]))
    return results


async def lower_bound(
    link: Link, stream: str, subject: str, holds: Callable[[Stored], bool]
) -> Stored | None:
    """The first stored message of ``subject`` (a filter) that ``holds``, or None.

    ``holds`` must hold for every message after one it holds for (a topic
    sequence or a time reached): a binary search over stream sequences, one
    direct get per step.
    """
    first = await link.get(stream, seq=0, next_by_subj=subject)
    if first is None or holds(first):
        return first
    best = await link.get(stream, last_by_subj=subject)
    if best is None or not holds(best):
        return None
    low, high = first.stream_seq + 1, best.stream_seq
    while low < high:  # the answer's stream sequence is in [low, high]; best is the message at high
        middle = (low + high) // 2
        probe = await link.get(stream, seq=middle, next_by_subj=subject)
        if probe is None:  # removed meanwhile
            break
        if holds(probe):
            high, best = middle, probe
        else:
            low = probe.stream_seq + 1
    return best


async def pages(link: Link, call: str, key: str, body: dict[str, Any] | None = None) -> list[Any]:
    """Every item under ``key`` of a paged JetStream listing (``STREAM.NAMES``, ``CONSUMER.LIST``)."""
    items: list[Any] = []
    while True:
        page = await link.api(call, {**(body or {}), "offset": len(items)})
        found = page.get(key) or []
        items += found
        if not found or len(items) >= page.get("total", 0):
            return items


async def subject_counts(link: Link, stream: str, subjects: str) -> dict[str, int]:
    """Stored messages per subject of ``stream`` matching the filter ``subjects``."""
    counts: dict[str, int] = {}
    while True:
        info = await link.api(f"STREAM.INFO.{stream}", {"subjects_filter": subjects, "offset": len(counts)})
        page = info["state"].get("subjects") or {}
        counts.update(page)
        if not page or len(counts) >= info.get("total", 0):
            return counts


async def read_range(link: Link, stream: str, subject: str, start: int, count: int) -> list[Delivery]:
    """Up to ``count`` messages of ``subject`` from stream sequence ``start``, by a throwaway consumer."""
    config = {
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": start,
        "ack_policy": "none",
        "filter_subject": subject,
        "inactive_threshold": int(30e9),
        "mem_storage": True,
    }
    info = await link.api(f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})
    name, inbox = info["name"], link.new_inbox()
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await link.subscribe(inbox, arrived.put)
    found: list[Delivery] = []
    try:
        request = json.dumps({"batch": count, "no_wait": True}).encode()
        await link.post(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", request, inbox)
        while len(found) < count:
            msg = await asyncio.wait_for(arrived.get(), link.timeout)
            if status(msg):  # 404 or 408: nothing more
                break
            found.append(Delivery.parse(msg, 0.0))
    finally:
        await sub.unsubscribe()
        await link.post(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")
    return found
