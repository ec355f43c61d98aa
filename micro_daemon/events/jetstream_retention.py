"""Retention for the JetStream events backend: purging a namespace's stream by age and count.

Age: JetStream stores messages in time order, so the first message stored
at or after the cutoff (a binary search) splits every topic of the stream at
the same stream sequence ``B``; everything below ``B`` goes, in one purge when
every topic of the namespace has the same age limit. Count: a purge per topic
keeping its newest ``max_count``. Before a purge can empty a topic, its last
sequence is written to its marker subject, so sequences never restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from micro_daemon.events.jetstream_queries import gather_map, lower_bound, subject_counts

if TYPE_CHECKING:
    from micro_daemon.events.jetstream import JetStreamEvents

__all__ = ["trim_namespace"]


async def trim_namespace(events: JetStreamEvents, namespace: str, now_ns: int) -> int:
    """Remove the events of ``namespace`` that retention no longer keeps as of ``now_ns``; return how many."""
    stream = events.names.stream(namespace)
    data = f"{events.names.root}.{namespace}.>"
    policies = [events.retention, *events.retention_overrides.values()]
    oldest = await events.link.get(stream, seq=0, next_by_subj=data)
    if oldest is None:
        return 0
    too_old = any(p.max_age_s is not None and oldest.stored_ns < now_ns - p.max_age_s * 1e9 for p in policies)
    if not too_old and all(p.max_count is None for p in policies):
        return 0  # the usual case: one direct get per namespace and run
    prefix = len(data) - 1
    counts = {
        subject[prefix:]: count
        for subject, count in (await subject_counts(events.link, stream, data)).items()
    }
    policy = {topic: events.retention_overrides.get(topic, events.retention) for topic in counts}
    removed = 0
    for age in sorted({p.max_age_s for p in policy.values() if p.max_age_s is not None}):
        topics = [topic for topic, p in policy.items() if p.max_age_s == age]
        removed += await _trim_age(events, namespace, counts, topics, now_ns - int(age * 1e9))
    for topic, p in policy.items():
        if p.max_count is not None and counts[topic] > p.max_count:
            removed += await _trim_count(events, namespace, topic, p.max_count)
    return removed


async def _trim_age(
    events: JetStreamEvents, namespace: str, counts: Mapping[str, int], topics: list[str], cutoff: int
) -> int:
    link, stream = events.link, events.names.stream(namespace)
    data = f"{events.names.root}.{namespace}.>"
    first = await link.get(stream, seq=0, next_by_subj=data)
    if first is None or first.stored_ns >= cutoff:
        return 0
    kept = await lower_bound(link, stream, data, lambda m: m.stored_ns >= cutoff)
    if kept is not None:
        boundary = kept.stream_seq
    else:
        last = await link.get(stream, last_by_subj=data)
        boundary = (last.stream_seq if last is not None else first.stream_seq) + 1
    # A topic with more events than there are stream sequences below the boundary keeps some.
    at_risk = [topic for topic in topics if counts[topic] <= boundary - first.stream_seq]
    await gather_map(lambda topic: _keep_last_seq(events, namespace, topic, boundary), at_risk)
    if len(topics) == len(counts):
        return await _purge(events, stream, {"filter": data, "seq": boundary})
    return sum(
        await gather_map(
            lambda topic: _purge(
                events, stream, {"filter": events.names.subject(namespace, topic), "seq": boundary}
            ),
            topics,
        )
    )


async def _trim_count(events: JetStreamEvents, namespace: str, topic: str, keep: int) -> int:
    subject = events.names.subject(namespace, topic)
    if keep == 0:
        await _keep_last_seq(events, namespace, topic, None)
        return await _purge(events, events.names.stream(namespace), {"filter": subject})
    return await _purge(events, events.names.stream(namespace), {"filter": subject, "keep": keep})


async def _keep_last_seq(events: JetStreamEvents, namespace: str, topic: str, below: int | None) -> None:
    """Write the marker of ``topic`` if its last event is below stream sequence ``below`` (None: any)."""
    stream = events.names.stream(namespace)
    last = await events.link.get(stream, last_by_subj=events.names.subject(namespace, topic))
    if last is not None and (below is None or last.stream_seq < below):
        await events.write_marker(namespace, topic, last.topic_seq)


async def _purge(events: JetStreamEvents, stream: str, request: Mapping[str, object]) -> int:
    answer = await events.link.api(f"STREAM.PURGE.{stream}", request)
    return int(answer.get("purged", 0))
