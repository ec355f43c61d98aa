"""The proxy: calls addressed to user services, routed to a live node of that service.

``Proxy`` is a ``grpc.GenericRpcHandler`` the daemon consults after its own
``Dispatcher``. It picks the service from metadata ``micro-service`` and the
registry domain from ``micro-namespace`` (falling back to domain ``micro``),
and forwards the call over a pooled channel to one of the service's nodes:
proto callers' bytes untouched, JSON callers' bodies transcoded with the
schema the service registered.

* ``directory``: the registry view, one ``Target`` per (domain, service), kept
  fresh by a registry watch per domain.
* ``channels``: one ``grpc.aio`` channel per node address, and which nodes
  recently failed to connect.
* ``forward``: the four call shapes, retries and error relaying.
* ``handler``: ``Proxy`` itself, which turns a call's addressing into a route.
"""

from __future__ import annotations

from micro_daemon.proxy.handler import Proxy

__all__ = ["Proxy"]
