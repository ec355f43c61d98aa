"""Rate limiting of failed secret checks, against guessing secrets.

Failures are counted per key (an account, a caller's address) in a sliding
window; ``limit`` failures within ``window`` seconds block that key for
``block`` seconds, during which every attempt, right or wrong, is answered
``TooManyRequests`` without checking the secret. State lives in this process
only, bounded to ``max_keys`` keys (the least recently failing are dropped).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from micro.errors import TooManyRequests

__all__ = ["Throttle"]

FAILURE_LIMIT = 5
WINDOW = 60.0
BLOCK = 60.0
MAX_KEYS = 100_000


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class Throttle:
    """Counts failures per key and refuses keys that failed too often, recently."""

    def __init__(
        self,
        *,
        limit: int = FAILURE_LIMIT,
        window: float = WINDOW,
        block: float = BLOCK,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[Hashable, _Failures] = OrderedDict()

    def check(self, key: Hashable, what: str) -> None:
        """Raise ``TooManyRequests`` (naming ``what``) if ``key`` is blocked now."""
        state = self._keys.get(key)
        if state is None:
            return
        remaining = state.blocked_until - self._clock()
        if remaining > 0:
            raise TooManyRequests(
                f"too many failed sign-ins for {what}: try again in {math.ceil(remaining)} s", id="auth"
            )

    def fail(self, key: Hashable) -> None:
        now = self._clock()
        state = self._keys.pop(key, None) or _Failures()
        self._keys[key] = state  # most recent last: the oldest are dropped first
        while state.times and state.times[0] <= now - self.window:
            state.times.popleft()
        state.times.append(now)
        if len(state.times) >= self.limit:
            state.blocked_until = now + self.block
            state.times.clear()
        if len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def succeed(self, key: Hashable) -> None:
        """Forget ``key``'s failures (after a right secret; never for an address)."""
        self._keys.pop(key, None)
