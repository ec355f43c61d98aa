"""A micro service: handlers served over gRPC, registered with the daemon, stopped cleanly.

A complete service (``micro new`` writes one like it)::

    from micro import Context, Service, errors
    from proto import helloworld_pb2 as pb


    class Helloworld:
        async def Call(self, request: pb.Request, context: Context) -> pb.Response:
            if not request.name:
                raise errors.BadRequest("name is required")
            return pb.Response(msg=f"Hello {request.name}")

        async def Stream(self, request: pb.StreamingRequest, context: Context):
            for i in range(request.count):
                yield pb.StreamingResponse(count=i)

        async def PingPong(self, requests, context: Context):
            async for ping in requests:
                yield pb.Pong(stroke=ping.stroke)


    service = Service("helloworld")
    service.handle(Helloworld())

    if __name__ == "__main__":
        service.run()

The runtime (``micro run``) sets the service's identity in the environment
(``MICRO_SERVICE_NAME``, ``MICRO_NAMESPACE``, ``MICRO_PROXY``); run by hand,
the service finds the local daemon through ``MICRO_HOME``'s state file.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor

from micro._binding import Method, bind
from micro._debug import DebugHandler
from micro._dispatch import Dispatcher
from micro._subscribers import Consumption, Handler, Subscription
from micro.auth import PUBLIC_KEY_ENV, offline_authenticator
from micro.client import Client
from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import ConnectError, MicroError, SetupError
from micro.proto import debug_pb2, registry_pb2
from micro.schema import endpoints, file_descriptor_set

if TYPE_CHECKING:
    import grpc.aio

    from micro.config import ConfigClient
    from micro.store import StoreClient

__all__ = ["Service", "current_service"]

log = logging.getLogger("micro.service")

REGISTER_TTL = 30.0
REGISTER_INTERVAL = 10.0
# How long a stopping service stays reachable after deregistering, so that proxies that
# chose it just before see their calls through before the server refuses new ones.
DEREGISTER_GRACE = 0.3

_current: Service | None = None


def current_service() -> Service:
    """The service this process runs (the last one started). ``SetupError`` if none is."""
    if _current is None:
        raise SetupError("no micro service is running in this process: create a Service and start it")
    return _current


class Service:
    """One named service: its handlers, its gRPC server and its registration."""

    def __init__(
        self,
        name: str | None = None,
        *,
        version: str | None = None,
        metadata: Mapping[str, str] | None = None,
        address: str | None = None,
    ) -> None:
        env = os.environ
        # The runtime's identity wins over the code's: `micro run --name x` names the service.
        self.name = env.get("MICRO_SERVICE_NAME") or name or ""
        if not self.name:
            raise SetupError("a service needs a name: Service('helloworld'), or run it with `micro run`")
        self.version = env.get("MICRO_SERVICE_VERSION") or version or "latest"
        self.namespace = validate_namespace(env.get("MICRO_NAMESPACE") or DEFAULT_NAMESPACE)
        self.metadata = dict(metadata or {})
        self.address = address or env.get("MICRO_SERVICE_ADDRESS") or "127.0.0.1:0"
        self.register_ttl = float(env.get("MICRO_REGISTER_TTL") or REGISTER_TTL)
        self.register_interval = float(
            env.get("MICRO_REGISTER_INTERVAL") or min(REGISTER_INTERVAL, self.register_ttl / 3)
        )
        # With the daemon's public key (the runtime passes it), each call's token is verified here,
        # offline, and its account is on the handler's Context.
        self.dispatcher = Dispatcher(authenticate=offline_authenticator(env.get(PUBLIC_KEY_ENV)))
        self._handlers: list[tuple[ServiceDescriptor, list[Method]]] = []
        self._entrypoints: list[Subscription | Consumption] = []
        self._server: grpc.aio.Server | None = None
        self._client: Client | None = None
        self._node = registry_pb2.Node(id=f"{self.name}-{uuid.uuid4()}")
        self._heartbeat: asyncio.Task[None] | None = None
        self._started = False

    # -- handlers ---------------------------------------------------------------------------------

    def handle(
        self, handler: object, *, proto: ServiceDescriptor | ModuleType | None = None, name: str | None = None
    ) -> None:
        """Serve ``handler``'s methods as the RPCs of the proto service of the same name.

        ``proto`` names the proto service (a ``ServiceDescriptor``, or the
        generated ``_pb2`` module that defines it) when the handler's class name
        differs or several imported protos define that name.
        """
        if self._started:
            raise SetupError("add handlers before the service starts")
        descriptor = _find_service(handler, proto)
        methods = bind(handler, descriptor, name)
        self.dispatcher.add(self.name, methods)
        self._handlers.append((descriptor, methods))

    def subscribe(self, topic: str, *, queue: str = "") -> Callable[[Handler], Handler]:
        """Decorate ``async def on_message(message)`` to receive ``topic``'s broker messages.

        The parameter's annotation picks the decoding: a protobuf message type,
        ``bytes``, ``broker_pb2.Message`` for the raw message, else the JSON value.
        Subscribers sharing a ``queue`` name share the messages.
        """

        def register(handler: Handler) -> Handler:
            self._add_entrypoint(Subscription(topic, handler, queue=queue))
            return handler

        return register

    def consume(
        self,
        topic: str,
        *,
        group: str | None = None,
        start: str = "group",
        ack_wait: float = 30.0,
        retry_limit: int = 5,
    ) -> Callable[[Handler], Handler]:
        """Decorate ``async def on_event(event)`` to receive ``topic``'s events, once per ``group``.

        ``group`` defaults to the service's name, so its instances share the
        events. The event is acked when the handler returns and redelivered
        when it raises; after ``retry_limit`` deliveries it goes to ``<topic>.dead``.
        """

        def register(handler: Handler) -> Handler:
            consumption = Consumption(
                topic,
                handler,
                group=group or self.name,
                start=start,
                ack_wait=ack_wait,
                retry_limit=retry_limit,
            )
            self._add_entrypoint(consumption)
            return handler

        return register

    def _add_entrypoint(self, entrypoint: Subscription | Consumption) -> None:
        if self._started:
            raise SetupError("add subscribers and consumers before the service starts")
        if not inspect.iscoroutinefunction(entrypoint.handler):
            raise TypeError(f"{entrypoint.name} must be an async function (async def)")
        self._entrypoints.append(entrypoint)

    # -- clients ----------------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """A client to call other services through the daemon, as this service's namespace."""
        if self._client is None:
            from micro.transport import connect

            self._client = Client(connect(_proxy_address()), namespace=self.namespace)
        return self._client

    def store(self, table: str | None = None) -> StoreClient:
        """The store, in this service's table (Micro's default) unless another is named."""
        from micro.store import StoreClient

        return StoreClient(self.client, table=table or _table_name(self.name))

    @property
    def config(self) -> ConfigClient:
        from micro.config import ConfigClient

        return ConfigClient(self.client)

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, register, and keep the registration alive."""
        global _current
        if not self._handlers and not self._entrypoints:
            raise SetupError(
                f"service {self.name!r} has nothing to serve: call service.handle(...) or add a subscriber"
            )
        self._started = True
        self._add_debug()
        await self._listen()
        await self._register()
        self._heartbeat = asyncio.create_task(self._keep_registered())
        for entrypoint in self._entrypoints:
            entrypoint.launch(self.client)
        _current = self
        log.info("Starting [service] %s on %s (namespace %s)", self.name, self._node.address, self.namespace)

    async def stop(self, grace: float = 10.0) -> None:
        """Deregister, let in-flight calls finish (up to ``grace`` seconds), then close. Never raises."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        for entrypoint in self._entrypoints:
            await entrypoint.stop()
        if self._server is not None:
            try:
                await self._registry().deregister(self._entry())
            except MicroError as exc:
                log.warning("could not deregister %s: %s", self.name, exc)
            await asyncio.sleep(DEREGISTER_GRACE)
            await self._server.stop(grace)
            self._server = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        log.info("Stopped [service] %s", self.name)

    def run(self) -> None:
        """Start, serve until SIGINT or SIGTERM, then stop. A second signal exits at once."""
        _configure_logging()
        try:
            asyncio.run(self._run())
        except MicroError as exc:
            print(f"Error: {exc.detail}", file=sys.stderr)
            sys.exit(1)

    async def _run(self) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stopping.is_set():
                os._exit(130)
            stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await self.start()
        try:
            await stopping.wait()
        finally:
            await self.stop()

    # -- internals --------------------------------------------------------------------------------

    def _add_debug(self) -> None:
        debug = DebugHandler(self.dispatcher.counters, {})
        self.dispatcher.add(self.name, bind(debug, debug_pb2.DESCRIPTOR.services_by_name["Debug"]))

    async def _listen(self) -> None:
        import grpc.aio

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self.dispatcher,))
        host = self.address.rpartition(":")[0]
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise SetupError(f"service {self.name!r} cannot listen on {self.address}: is the port in use?")
        await server.start()
        self._server = server
        self._node.address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self._node.metadata.update({"protocol": "grpc", "pid": str(os.getpid())})

    def _registry(self) -> Any:
        from micro.registry import RegistryClient

        return RegistryClient(self.client)

    def _entry(self) -> registry_pb2.Service:
        return registry_pb2.Service(
            name=self.name, version=self.version, metadata=self.metadata, nodes=[self._node]
        )

    def _full_entry(self) -> registry_pb2.Service:
        entry = self._entry()
        for descriptor, methods in self._handlers:
            entry.endpoints.extend(endpoints(descriptor, methods[0].handler))
        entry.endpoints.extend(endpoints(debug_pb2.DESCRIPTOR.services_by_name["Debug"]))
        entry.endpoints.extend(e.endpoint() for e in self._entrypoints)
        entry.schema = _schema([d.file for d, _ in self._handlers])
        return entry

    async def _register(self) -> None:
        try:
            await self._registry().register(self._full_entry(), ttl=int(self.register_ttl))
        except ConnectError as exc:
            raise SetupError(
                f"service {self.name!r} cannot reach the micro server at {_proxy_address()}: "
                "start it with `micro server`, or set MICRO_PROXY=HOST:PORT"
            ) from exc

    async def _keep_registered(self) -> None:
        while True:
            await asyncio.sleep(self.register_interval)
            try:
                await self._registry().register(self._full_entry(), ttl=int(self.register_ttl))
            except MicroError as exc:  # the daemon may be restarting: try again next beat
                log.warning("could not renew the registration of %s: %s", self.name, exc)


def _find_service(handler: object, proto: ServiceDescriptor | ModuleType | None) -> ServiceDescriptor:
    name = type(handler).__name__
    if isinstance(proto, ServiceDescriptor):
        return proto
    modules = [proto] if proto is not None else [m for m in list(sys.modules.values()) if _is_pb2(m)]
    found: list[ServiceDescriptor] = [
        m.DESCRIPTOR.services_by_name[name] for m in modules if name in m.DESCRIPTOR.services_by_name
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise SetupError(
            f"no proto service named {name!r} is imported: import its generated _pb2 module, "
            "or pass proto=<module or ServiceDescriptor> to handle()"
        )
    names = ", ".join(sorted(f.full_name for f in found))
    raise SetupError(f"several proto services are named {name!r} ({names}): pass proto= to handle()")


def _is_pb2(module: ModuleType | None) -> bool:
    return (
        module is not None
        and module.__name__.endswith("_pb2")
        and isinstance(getattr(module, "DESCRIPTOR", None), FileDescriptor)
    )


def _schema(files: list[FileDescriptor]) -> bytes:
    """The build's descriptor set (it keeps the proto comments), else one made from the descriptors.

    Either way it includes ``Debug``'s proto, whose endpoints every service serves.
    """
    from google.protobuf import descriptor_pb2

    own = descriptor_pb2.FileDescriptorSet.FromString(file_descriptor_set(*files, debug_pb2.DESCRIPTOR))
    path = os.environ.get("MICRO_SCHEMA_FILE")
    if not path:
        return own.SerializeToString()
    try:
        built = descriptor_pb2.FileDescriptorSet.FromString(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        log.warning("cannot read MICRO_SCHEMA_FILE %s (%s): registering without comments", path, exc)
        return own.SerializeToString()
    names = {f.name for f in built.file}
    built.file.extend(f for f in own.file if f.name not in names)
    return built.SerializeToString()


def _proxy_address() -> str:
    address = os.environ.get("MICRO_PROXY")
    if address:
        return address
    from micro.home import Home

    home = Home.from_env()
    state = home.read_state()
    if state is None or not home.daemon_running():
        raise SetupError(
            "no micro server is running: start one with `micro server` (or run the service with "
            "`micro run`), or set MICRO_PROXY=HOST:PORT"
        )
    return state.client_address


def _table_name(service: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in service)[:128]


def _configure_logging() -> None:
    if logging.getLogger().handlers:
        return
    # Under the runtime every line is stamped as it is captured: don't print the time twice.
    stamp = "" if os.environ.get("MICRO_SERVICE_NAME") else "%(asctime)s "
    logging.basicConfig(
        level=os.environ.get("MICRO_LOG_LEVEL", "INFO").upper(),
        format=stamp + "level=%(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
