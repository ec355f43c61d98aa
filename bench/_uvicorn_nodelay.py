"""``python -m uvicorn``, but the socket ``--reload`` binds is a TCP socket asyncio recognises.

With ``--reload`` (or ``--workers``), uvicorn binds the listening socket itself with
``socket.socket(family=AF_INET)``: its ``proto`` is 0, so asyncio's transports never set
``TCP_NODELAY`` on the connections it accepts (``_set_nodelay`` checks ``proto == IPPROTO_TCP``).
A response goes out in two writes (head, body), so Nagle holds the body until the client's
delayed ACK: about 40 ms per request, some 20 requests a second on one keep-alive connection.
That would make the steady stream of ``reload_latency.py`` twenty times thinner than micro's and
detect the new answer up to 45 ms late. This launcher returns the same socket with
``proto=IPPROTO_TCP``; uvicorn's reloader, worker and watch are untouched. Arguments: uvicorn's.
"""

from __future__ import annotations

import socket
import sys

import uvicorn.config

_bind_socket = uvicorn.config.Config.bind_socket


def _bind_tcp_socket(self: uvicorn.config.Config) -> socket.socket:
    sock = _bind_socket(self)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        sock.set_inheritable(True)
    return sock


uvicorn.config.Config.bind_socket = _bind_tcp_socket  # type: ignore[method-assign]

if __name__ == "__main__":  # the reloader's workers start with multiprocessing's spawn: they import this
    from uvicorn.main import main

    sys.exit(main())
