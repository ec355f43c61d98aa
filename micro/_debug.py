"""The ``Debug`` endpoints every service and the daemon serve: health and process statistics."""

from __future__ import annotations

import gc
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

from micro._dispatch import Counters
from micro.context import Context
from micro.proto import debug_pb2

__all__ = ["DebugHandler"]

HealthCheck = Callable[[], Awaitable[str]]


class DebugHandler:
    """Serves ``Debug.Health`` (with a named check per engine) and ``Debug.Stats`` for one process."""

    def __init__(self, counters: Counters, checks: Mapping[str, HealthCheck]) -> None:
        self.counters = counters
        self.checks = checks
        self.started = time.time()

    async def Health(self, request: debug_pb2.HealthRequest, context: Context) -> debug_pb2.HealthResponse:
        results = {name: await check() for name, check in self.checks.items()}
        status = "ok" if all(r == "ok" for r in results.values()) else "degraded"
        return debug_pb2.HealthResponse(status=status, checks=results)

    async def Stats(self, request: debug_pb2.StatsRequest, context: Context) -> debug_pb2.StatsResponse:
        now = time.time()
        return debug_pb2.StatsResponse(
            timestamp=int(now),
            started=int(self.started),
            uptime=int(now - self.started),
            memory=_resident_bytes(),
            threads=threading.active_count(),
            gc=sum(s["collections"] for s in gc.get_stats()),
            requests=self.counters.requests,
            errors=self.counters.errors,
        )


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
