"""The API gateway: Micro's HTTP API to every service, served in the daemon's event loop.

``POST /helloworld/call`` with a JSON body calls ``Helloworld.Call`` of the
service ``helloworld`` in the namespace of the ``Micro-Namespace`` header
(default ``micro``) and answers its JSON response, or an error as
``{"id", "code", "detail", "status"}`` with that HTTP status.

* ``resolve``: Micro's path resolver (path → service and endpoint).
* ``rules``: explicit routes (``google.api.http`` options, endpoint metadata).
* ``routing``: namespace + method + path → the endpoint's ``Plan``, cached on
  the proxy's directory.
* ``payload``: bodies, query strings, forms and captures → request messages.
* ``upstream``: calling an endpoint in-process (building blocks) or over gRPC
  (user services, with the proxy's channels and dead-node retries).
* ``streams``: server-streaming as Server-Sent Events, any shape over WebSocket.
* ``server``: ``Gateway``, the aiohttp server, CORS and errors.
"""

from __future__ import annotations

from micro_daemon.gateway.server import Gateway

__all__ = ["Gateway"]
