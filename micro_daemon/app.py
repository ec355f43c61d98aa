"""The daemon's assembly: backends, building blocks, the gRPC server, and its life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Mapping
from importlib import resources
from typing import IO, TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor

from micro import __version__
from micro._binding import Method, bind
from micro._debug import DebugHandler
from micro._dispatch import Dispatcher
from micro.auth import Account
from micro.context import Context
from micro.errors import MicroError, SetupError
from micro.home import DaemonState, Home
from micro.proto import (
    auth_pb2,
    broker_pb2,
    config_pb2,
    debug_pb2,
    events_pb2,
    registry_pb2,
    runtime_pb2,
    store_pb2,
)
from micro.schema import endpoints
from micro_daemon.auth.disabled import AuthDisabled
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.gate import Gate
from micro_daemon.auth.keys import PRIVATE_KEY_ENV, KeyPair
from micro_daemon.auth.owner import RENEW_INTERVAL, OwnerCredential
from micro_daemon.auth.service import AccountsHandler, AuthHandler, RulesHandler
from micro_daemon.auth.service_accounts import ServiceAccounts
from micro_daemon.auth.shared_key import load_or_create_shared
from micro_daemon.broker.backend import BrokerBackend
from micro_daemon.broker.service import BrokerHandler
from micro_daemon.config.engine import ConfigEngine
from micro_daemon.config.secrets import KEY_ENV, SecretBox
from micro_daemon.config.service import ConfigHandler
from micro_daemon.engines import PROFILES, open_engine, redact
from micro_daemon.events.backend import EventsBackend
from micro_daemon.events.service import EventsStoreHandler, StreamHandler
from micro_daemon.proxy import Proxy
from micro_daemon.registry.backend import RegistryBackend
from micro_daemon.registry.service import RegistryHandler
from micro_daemon.relay.relay import Relay
from micro_daemon.relay.routing import ServiceRouter
from micro_daemon.runtime.manager import Runtime
from micro_daemon.runtime.service import RuntimeHandler
from micro_daemon.settings import Settings, parse_address
from micro_daemon.store.backend import StoreBackend
from micro_daemon.store.service import StoreHandler
from micro_daemon.tls import TlsFiles, load_tls

if TYPE_CHECKING:
    from micro_daemon.gateway import Gateway

__all__ = ["Daemon", "run"]

log = logging.getLogger("micro.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PURGE_INTERVAL = 60.0
EXPIRE_INTERVAL = 1.0
BLOCKS_DOMAIN = "micro"


class Daemon:
    """One process serving every building block over gRPC on ``settings.address``."""

    def __init__(self, settings: Settings, home: Home) -> None:
        self.settings = settings
        self.home = home
        self.address = settings.address
        # Where this machine's services connect, plaintext: with TLS, a loopback port of its own.
        self.local_address = settings.address
        self.api_address = settings.api_address
        self._tls: TlsFiles | None = None
        self._gateway: Gateway | None = None
        self._lock_file: IO[str] | None = None
        self._server: grpc.aio.Server | None = None
        self._store: StoreBackend | None = None
        self._registry: RegistryBackend | None = None
        self._broker: BrokerBackend | None = None
        self._events: EventsBackend | None = None
        self._proxy: Proxy | None = None
        self._relay: Relay | None = None
        self._runtime: Runtime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._blocks: list[registry_pb2.Service] = []
        self.gate = Gate(None)
        self.dispatcher = Dispatcher(authenticate=self._authenticate, admit=self._admit)
        self._owner: OwnerCredential | None = None
        self._started = 0.0

    async def start(self) -> None:
        """Open the backends, bind the port, register the blocks and publish the state file."""
        self.home.ensure()
        self._lock()
        self._started = time.time()
        try:
            await self._open_backends()
            await self._serve()
            assert self._proxy is not None and self._runtime is not None
            await self._runtime.restore()
            if self._owner is not None:
                await self._owner.publish()  # before the state file: a CLI that sees it can sign in
            self._publish_state()  # the gRPC address answers: a waiting CLI may go on
            log.info(
                "micro server %s listening on %s%s (MICRO_HOME %s)",
                __version__,
                self.address,
                f" with TLS (local services on {self.local_address})" if self._tls else "",
                self.home.data_dir,
            )
            # aiohttp takes a third of the start-up to import (a thread, so that the gRPC port
            # answers meanwhile); started only now: a thread importing competes for the GIL.
            gateway = await asyncio.to_thread(importlib.import_module, "micro_daemon.gateway")
            self._gateway = gateway.Gateway(
                self._proxy, self.dispatcher, registry=self._registry, gate=self.gate
            )
            ssl_context = self._tls.ssl_context() if self._tls else None
            self.api_address = await self._gateway.start(self.settings.api_address, ssl_context=ssl_context)
        except BaseException:
            await self.stop()
            raise
        self._publish_state()
        log.info("API gateway on %s://%s", "https" if self._tls else "http", self.api_address)
        log.info("profile %s: %s", self.settings.profile, self.engines())
        if not self.gate.enabled:
            log.warning("auth is disabled (--auth none): every caller acts as an administrator")
        if self.settings.profile == "platform" and not os.environ.get(KEY_ENV):
            log.warning(
                "%s is not set: config secrets set through this daemon can be read only through it; "
                "give every daemon of the platform the same key (base64 of 32 random bytes)",
                KEY_ENV,
            )

    def _publish_state(self) -> None:
        self.home.write_state(
            DaemonState(
                pid=os.getpid(),
                address=self.address,
                api_address=self.api_address,
                started=self._started,
                version=__version__,
                tls=self._tls is not None,
                local_address=self.local_address,
            )
        )

    def engines(self) -> str:
        """The engine of each block, addresses without passwords (for the start banner)."""
        settings = self.settings
        chosen = {
            "store": settings.store_address,
            "events": settings.events_address,
            "broker": settings.broker_address,
            "registry": settings.registry_address,
        }
        defaults = PROFILES.get(settings.profile, {})
        return ", ".join(
            f"{block} {redact(address or defaults.get(block, '?'))}" for block, address in chosen.items()
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Drain in-flight calls, flush and close the backends, remove the state file. Never raises."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._gateway is not None:
            await self._gateway.stop(grace)
            self._gateway = None
        if self._runtime is not None:
            await self._runtime.shutdown()  # the services deregister while the registry still answers
        if self._server is not None:
            await self._server.stop(grace)
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        if self._registry is not None:
            await self._registry.close()
        if self._broker is not None:
            await self._broker.close()
        if self._events is not None:
            await self._events.close()
        if self._store is not None:
            await self._store.close()
        if self._lock_file is not None:
            if self._owner is not None:
                self._owner.withdraw()
            self.home.clear_state(os.getpid())
            self._lock_file.close()
            self._lock_file = None
        if self._server is not None:
            self._server = None
            log.info("micro server stopped")

    def _lock(self) -> None:
        lock = open(self.home.server_lock, "a+")  # held open for the daemon's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            state = self.home.read_state()
            pid = f" (pid {state.pid}, {state.address})" if state else ""
            raise SetupError(
                f"a micro server is already running for {self.home.state_dir}{pid}: stop it first, "
                "or set MICRO_HOME to another folder",
                id="micro.server",
            ) from None
        self._lock_file = lock

    async def _authenticate(self, metadata: Mapping[str, str]) -> tuple[Account | None, MicroError | None]:
        return await self.gate.authenticate(metadata)

    def _node_gone(self, address: str) -> None:
        if self._relay is not None:
            self._relay.discard(address)

    def _admit(self, context: Context) -> None:
        self.gate.admit_block(context)

    def _platform_without_key(self) -> bool:
        """A platform daemon given no signing key: it shares one through the store, if it can."""
        return self.settings.profile == "platform" and not os.environ.get(PRIVATE_KEY_ENV)

    def _shared_keys(self) -> bool:
        """Whether every daemon of the platform signs with one key kept in the shared store."""
        return self._platform_without_key() and bool(os.environ.get(KEY_ENV))

    def _load_local_keys(self) -> asyncio.Future[KeyPair] | None:
        """Start loading (or, on a first start, generating) this daemon's own key pair, in a thread:
        generating one takes 0.1-1 s, which the engines' opening hides (it releases the GIL)."""
        if self.settings.auth == "none" or self._shared_keys():
            return None
        return asyncio.ensure_future(asyncio.to_thread(KeyPair.load_or_create, self.home.config_dir))

    async def _open_auth(
        self, store: StoreBackend, secrets: SecretBox, local_keys: asyncio.Future[KeyPair] | None
    ) -> AuthEngine | None:
        if self.settings.auth == "none":
            return None
        if local_keys is None:
            keys = await load_or_create_shared(store, secrets)  # every daemon signs with the same key
        else:
            if self._platform_without_key():  # and no KEY_ENV to share one with
                log.warning(
                    "%s is not set: this daemon signs tokens with its own key, which other daemons of "
                    "the platform do not accept; set it (or %s) the same on every daemon",
                    KEY_ENV,
                    PRIVATE_KEY_ENV,
                )
            keys = await local_keys
        engine = AuthEngine(
            store,
            keys,
            token_lifetime=int(self.settings.auth_token_lifetime),
            disable_default_admin=self.settings.default_admin_disabled,
        )
        self._owner = OwnerCredential(engine, self.home.owner_token)
        return engine

    async def _open_backends(self) -> None:
        settings, data = self.settings, self.home.data_dir
        local_keys = self._load_local_keys()
        try:
            self._store = await open_engine("store", settings.store_address, settings.profile, data)
            self._registry = await open_engine("registry", settings.registry_address, settings.profile, data)
            self._broker = await open_engine("broker", settings.broker_address, settings.profile, data)
            self._events = await open_engine("events", settings.events_address, settings.profile, data)
            secrets = SecretBox.load_or_create(self.home.config_dir / "config_secret_key")
            auth = await self._open_auth(self._store, secrets, local_keys)
        finally:
            if local_keys is not None:
                if not local_keys.done():
                    local_keys.cancel()  # an engine failed first: its thread finishes, unread
                elif not local_keys.cancelled():
                    local_keys.exception()  # read: never "never retrieved"
        self.gate = Gate(auth)
        self._runtime = Runtime(
            self.home,
            store=self._store,
            registry=self._registry,
            proxy_address=lambda: self.local_address,
            adopt_unscoped=settings.profile == "local",  # the store is this daemon's alone
            accounts=ServiceAccounts(auth),
            register_ttl=float(settings.registry_ttl),
        )
        config = ConfigEngine(self._store, secrets)
        ttl = float(self.settings.registry_ttl)
        blocks: dict[str, list[tuple[object, ServiceDescriptor]]] = {
            "store": [(StoreHandler(self._store), store_pb2.DESCRIPTOR.services_by_name["Store"])],
            "config": [(ConfigHandler(config), config_pb2.DESCRIPTOR.services_by_name["Config"])],
            "registry": [
                (
                    RegistryHandler(self._registry, default_ttl=ttl),
                    registry_pb2.DESCRIPTOR.services_by_name["Registry"],
                )
            ],
            "runtime": [(RuntimeHandler(self._runtime), runtime_pb2.DESCRIPTOR.services_by_name["Runtime"])],
            "broker": [(BrokerHandler(self._broker), broker_pb2.DESCRIPTOR.services_by_name["Broker"])],
            "events": [
                (StreamHandler(self._events), events_pb2.DESCRIPTOR.services_by_name["Stream"]),
                (EventsStoreHandler(self._events), events_pb2.DESCRIPTOR.services_by_name["Store"]),
            ],
        }
        auth_handlers: tuple[object, ...] = (
            (AuthHandler(auth), AccountsHandler(auth), RulesHandler(auth)) if auth else (AuthDisabled(),) * 3
        )
        blocks["auth"] = [
            (handler, auth_pb2.DESCRIPTOR.services_by_name[name])
            for handler, name in zip(auth_handlers, ("Auth", "Accounts", "Rules"), strict=True)
        ]
        checks = {
            name: backend.health
            for name, backend in (
                ("store", self._store),
                ("events", self._events),
                ("broker", self._broker),
                ("registry", self._registry),
            )
            if backend is not None
        }
        debug = DebugHandler(self.dispatcher.counters, checks)
        debug_methods = bind(debug, debug_pb2.DESCRIPTOR.services_by_name["Debug"])
        for name, handlers in blocks.items():
            methods = [m for handler, descriptor in handlers for m in bind(handler, descriptor)]
            self.dispatcher.add(name, methods + debug_methods)
            self._blocks.append(_block_entry(name, methods + debug_methods))

    async def _serve(self) -> None:
        host, port = parse_address(self.address)
        self._tls = load_tls(self.settings)
        _check_port_free(host, port, self.address)
        # The blocks (and the proxy's slow paths) are served by grpc.aio on a private loopback
        # port; callers reach it, and user services' nodes, through the relay on the public port.
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        assert self._registry is not None
        self._proxy = Proxy(self._registry, gate=self.gate, on_gone=self._node_gone)
        await self._proxy.start()
        server.add_generic_rpc_handlers((self.dispatcher, self._proxy))
        internal = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        self._server = server
        router = ServiceRouter(self._proxy.directory, self.gate, internal, self.dispatcher)
        self.dispatcher.relay_secret = router.secret
        self._relay = Relay(router)
        try:
            ssl_context = self._tls.relay_ssl_context() if self._tls else None
            bound = await self._relay.listen(host, port, ssl=ssl_context)
        except OSError:
            raise _port_error(host, port, self.address) from None
        self.address = self.local_address = f"{host}:{bound}"
        if self._tls is not None:
            self.local_address = f"127.0.0.1:{await self._relay.listen('127.0.0.1', 0)}"
        await self._register_blocks()
        self._tasks = [
            asyncio.create_task(self._every(PURGE_INTERVAL, self._purge)),
            asyncio.create_task(self._every(EXPIRE_INTERVAL, self._expire)),
            asyncio.create_task(self._every(float(self.settings.registry_ttl) / 3, self._register_blocks)),
        ]
        if self._owner is not None:
            self._tasks.append(asyncio.create_task(self._every(RENEW_INTERVAL, self._owner.publish)))

    async def _register_blocks(self) -> None:
        assert self._registry is not None
        ttl = float(self.settings.registry_ttl)
        for block in self._blocks:
            block.nodes[0].address = self.address
            await self._registry.register(BLOCKS_DOMAIN, block, ttl)

    async def _purge(self) -> None:
        assert self._store is not None and self._events is not None
        purged = await self._store.purge_expired()
        if purged:
            log.info("purged %d expired records", purged)
        dropped = await self._events.apply_retention()
        if dropped:
            log.info("dropped %d events past their retention", dropped)

    async def _expire(self) -> None:
        assert self._registry is not None
        await self._registry.expire()

    @staticmethod
    async def _every(interval: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except MicroError as error:  # an engine away for a while: one line each time, not a traceback
                log.warning("background job %s failed: %s", getattr(job, "__name__", job), error.detail)
            except Exception:
                log.exception("background job %s failed", getattr(job, "__name__", job))


def _check_port_free(host: str, port: int, address: str) -> None:
    """Fail with our message before gRPC logs its own about a port it cannot bind."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise _port_error(host, port, address) from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError:
            raise _port_error(host, port, address) from None


def _port_error(host: str, port: int, address: str) -> SetupError:
    return SetupError(
        f"cannot listen on {address}: port {port} is in use or the address is not this "
        f"machine's; choose another with --address {host}:PORT or MICRO_SERVER_ADDRESS",
        id="micro.server",
    )


def _block_entry(name: str, methods: list[Method]) -> registry_pb2.Service:
    """The registry entry of a building block, with the schema (and comments) of its protos."""
    services = {m.descriptor.containing_service for m in methods}
    return registry_pb2.Service(
        name=name,
        version=__version__,
        metadata={"type": "building-block"},
        nodes=[registry_pb2.Node(id=f"{name}-{uuid.uuid4()}", metadata={"protocol": "grpc"})],
        endpoints=[e for s in sorted(services, key=lambda s: s.full_name) for e in endpoints(s)],
        schema=_blocks_schema({s.file.name for s in services}),
    )


def _blocks_schema(files: set[str]) -> bytes:
    data = resources.files("micro.proto").joinpath("blocks.binpb").read_bytes()
    full = descriptor_pb2.FileDescriptorSet.FromString(data)
    subset = descriptor_pb2.FileDescriptorSet(file=[f for f in full.file if f.name in files])
    return subset.SerializeToString()


def run(settings: Settings, home: Home) -> None:
    """Run the daemon in the foreground until SIGINT or SIGTERM (a second Ctrl-C exits at once)."""
    asyncio.run(_run(settings, home))


async def _run(settings: Settings, home: Home) -> None:
    daemon = Daemon(settings, home)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set():
            os._exit(130)  # a second Ctrl-C: the user wants out now
        stopping.set()

    # Before start-up: a signal during it (the gateway starts after the state file is out, so a
    # caller may already be done with the daemon) stops it cleanly rather than interrupting it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.ensure_future(daemon.start())
    signalled = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # start() stops what it opened
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # a start-up error ends the daemon here
            await stopping.wait()
        log.info("shutting down")
    finally:
        signalled.cancel()
        await daemon.stop()
