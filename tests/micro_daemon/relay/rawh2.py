"""A bare HTTP/2 client, for the frames (and the mistakes) grpc's own client never sends."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import hpack

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WAIT = 5.0


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


@dataclass
class Response:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    @property
    def messages(self) -> list[bytes]:
        """The gRPC messages of ``data``."""
        out, rest = [], self.data
        while rest:
            size = int.from_bytes(rest[1:5], "big")
            out.append(rest[5 : 5 + size])
            rest = rest[5 + size :]
        return out


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def settings(**values: int) -> bytes:
    ids = {"initial_window_size": INITIAL_WINDOW_SIZE, "max_frame_size": MAX_FRAME_SIZE}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def grpc_message(data: bytes) -> bytes:
    return b"\x00" + len(data).to_bytes(4, "big") + data


class RawClient:
    """One connection to ``address``; ``send`` writes bytes, ``frame`` reads the next frame.

    Every frame read goes to ``received``; header blocks are decoded (in order, as HPACK needs)
    and, with DATA and RST_STREAM, gathered into ``responses`` by stream.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.received: list[Frame] = []
        self.responses: dict[int, Response] = {}
        self._block = b""

    @classmethod
    async def connect(cls, address: str, *, preface: bytes = PREFACE + settings()) -> RawClient:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        client = cls(reader, writer)
        client.send(preface)
        return client

    def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))

    def request(self, path: str, *metadata: tuple[str, str]) -> bytes:
        """A gRPC request's header block, encoded with this connection's (indexing) encoder."""
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "relay"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        return bytes(self.encoder.encode(fields))

    async def frame(self, within: float = WAIT) -> Frame | None:
        """The next frame, ``None`` at the end of the connection."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), within)
            length = int.from_bytes(head[:3], "big")
            payload = await asyncio.wait_for(self.reader.readexactly(length), WAIT)
        except asyncio.IncompleteReadError:
            return None
        got = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
        self.received.append(got)
        self._gather(got)
        return got

    def _gather(self, got: Frame) -> None:
        response = self.responses.setdefault(got.stream, Response())
        if got.kind in (HEADERS, CONTINUATION):
            self._block += got.payload
            if got.flags & END_HEADERS:
                fields = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(self._block, raw=True)]
                self._block = b""
                (response.trailers if response.headers else response.headers).extend(fields)
        elif got.kind == DATA:
            response.data += got.payload
        elif got.kind == RST_STREAM:
            response.reset = int.from_bytes(got.payload, "big")
        if got.kind == RST_STREAM or (got.kind in (HEADERS, DATA) and got.flags & END_STREAM):
            response.ended = True

    async def response(self, stream: int, *, window: bool = True) -> Response:
        """Stream ``stream``'s response, to its END_STREAM or RST_STREAM; ``window``: give its data back."""
        while not (response := self.responses.setdefault(stream, Response())).ended:
            got = await self.frame()
            assert got is not None, "the connection ended before the response"
            if window and got.kind == DATA and got.stream == stream and got.payload:
                self.send(window_update(0, len(got.payload)), window_update(stream, len(got.payload)))
        return response

    async def data_until_quiet(self, stream: int) -> bytes:
        """What DATA arrives on ``stream`` until none comes for a moment; the stream must not end."""
        response = self.responses.setdefault(stream, Response())
        before = len(response.data)
        while True:
            try:
                await self.frame(within=0.2 if len(response.data) > before else WAIT)
            except TimeoutError:
                assert not response.ended, "the stream ended"
                return response.data[before:]

    async def until_closed(self) -> list[Frame]:
        """Every frame up to the end of the connection."""
        frames = []
        while (got := await self.frame()) is not None:
            frames.append(got)
        return frames

    def abort(self) -> None:
        """Drop the connection without a word (as a crashed caller would)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def goaway_code(frames: list[Frame]) -> int:
    """The error code of the (one) GOAWAY in ``frames``."""
    (goaway,) = [f for f in frames if f.kind == GOAWAY]
    code: int = struct.unpack(">I", goaway.payload[4:8])[0]
    return code


class FakeNode:
    """An HTTP/2 server that misbehaves as ``mode`` says, on a call's HEADERS; else it echoes the call.

    ``goaway``: GOAWAY excluding the call, ``refuse``: RST_STREAM(REFUSED_STREAM), ``hangup``: close
    the connection, ``answer-then-hangup``: response headers then close, ``garbage``: bytes that are
    not HTTP/2. ``echo`` (with ``window`` for its SETTINGS_INITIAL_WINDOW_SIZE) answers the request's
    data, given back as it arrives, with ``grpc-status: 0``.
    """

    def __init__(self, mode: str, *, window: int = 65_535) -> None:
        self.mode = mode
        self.window = window
        self.calls = 0
        self.largest_data: dict[int, int] = {}  # the largest DATA frame of each call, by stream
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        peer = RawClient(reader, writer)
        peer.send(settings(initial_window_size=self.window))
        try:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            bodies: dict[int, bytes] = {}
            while (got := await peer.frame(within=60)) is not None:
                if got.kind == SETTINGS and not got.flags & ACK:
                    peer.send(frame(SETTINGS, ACK, 0))
                elif got.kind == HEADERS and got.stream not in bodies:
                    self.calls += 1
                    bodies[got.stream] = b""
                    if self._misbehave(peer, got.stream):
                        return
                elif got.kind == DATA:
                    largest = self.largest_data.get(got.stream, 0)
                    self.largest_data[got.stream] = max(largest, len(got.payload))
                    bodies[got.stream] += got.payload
                    if got.payload:
                        peer.send(
                            window_update(0, len(got.payload)), window_update(got.stream, len(got.payload))
                        )
                if got.kind in (HEADERS, DATA) and got.flags & END_STREAM:
                    self._echo(peer, got.stream, bodies[got.stream])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _misbehave(self, peer: RawClient, stream: int) -> bool:
        if self.mode == "goaway":
            peer.send(frame(GOAWAY, 0, 0, struct.pack(">II", stream - 2 if stream > 1 else 0, 0)))
        elif self.mode == "refuse":
            peer.send(frame(RST_STREAM, 0, stream, struct.pack(">I", 0x7)))
        elif self.mode == "hangup":
            return True
        elif self.mode == "answer-then-hangup":
            block = peer.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
            peer.send(frame(HEADERS, END_HEADERS, stream, block))
            return True
        elif self.mode == "garbage":
            peer.send(b"\xff" * 64)
        return False

    def _echo(self, peer: RawClient, stream: int, body: bytes) -> None:
        if self.mode != "echo":
            return
        head = peer.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        trailers = peer.encoder.encode([("grpc-status", "0"), ("x-fake", "yes")])
        chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
        peer.send(frame(HEADERS, END_HEADERS, stream, head), *(frame(DATA, 0, stream, c) for c in chunks))
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, stream, trailers))
