"""The daemon's choice of grpc's TCP transport, made before grpc is imported.

grpcio 1.85 runs TCP on EventEngine by default: a socket read wakes an EventEngine poller,
which hands it to a worker thread, which wakes the completion queue's thread, which wakes the
event loop. With the experiments below turned off, grpc polls the sockets from the completion
queue's own thread (its earlier iomgr transport): a proxied unary call costs the daemon ~40%
fewer context switches and ~10% less CPU (``bench/README.md``, on the proxy's targets).

grpc reads ``GRPC_EXPERIMENTS`` once, when it is first imported, so the daemon's entry points
call ``use_polling_transport`` before importing anything that imports grpc. Services the runtime
starts inherit the variable. The names are grpcio 1.85's (pinned in ``pyproject.toml``); a test
fails if the installed grpc does not know them.
"""

from __future__ import annotations

import os
import sys

__all__ = ["EXPERIMENTS", "use_polling_transport"]

EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def use_polling_transport() -> None:
    """Select the polling transport for this process and its children, unless the environment chose.

    Nothing to do once grpc is imported (a daemon started inside a process that already uses
    grpc, as tests do): the choice would not apply to it, and its children choose for themselves.
    """
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
