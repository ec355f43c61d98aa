from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from micro._binding import bind
from micro._dispatch import Dispatcher
from micro._grpc_errors import error_from_rpc
from micro.context import Context
from micro.errors import BadRequest
from micro.proto import broker_pb2
from micro_daemon.broker.memory import MemoryBroker
from micro_daemon.broker.service import BrokerHandler

TIMEOUT = 5.0


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    yield broker
    await broker.close()


def test_handler_matches_the_proto(broker: MemoryBroker) -> None:
    methods = bind(BrokerHandler(broker), broker_pb2.DESCRIPTOR.services_by_name["Broker"])
    assert [m.name for m in methods] == ["Publish", "Subscribe"]


async def test_publish_and_subscribe_in_the_callers_namespace(broker: MemoryBroker) -> None:
    handler = BrokerHandler(broker)
    messages: Any = handler.Subscribe(broker_pb2.SubscribeRequest(topic="t"), Context(namespace="alice"))
    first = asyncio.create_task(anext(messages))
    await asyncio.sleep(0.01)  # the subscription starts with the first read
    message = broker_pb2.Message(header={"a": "1"}, body=b"hi")
    for namespace in ("bob", "alice"):
        await handler.Publish(
            broker_pb2.PublishRequest(topic="t", message=message), Context(namespace=namespace)
        )
    assert await asyncio.wait_for(first, TIMEOUT) == message
    await messages.aclose()
    assert await broker.publish("alice", "t", message) == 0  # closing the stream unsubscribed


async def test_subscribe_over_grpc(broker: MemoryBroker) -> None:
    dispatcher = Dispatcher()
    dispatcher.add("broker", bind(BrokerHandler(broker), broker_pb2.DESCRIPTOR.services_by_name["Broker"]))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((dispatcher,))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            subscribe = channel.unary_stream(
                "/micro.broker.v1.Broker/Subscribe",
                request_serializer=broker_pb2.SubscribeRequest.SerializeToString,
                response_deserializer=broker_pb2.Message.FromString,
            )
            call = subscribe(broker_pb2.SubscribeRequest(topic="t", queue="q"))
            while await broker.publish("micro", "t", broker_pb2.Message(body=b"x")) == 0:
                await asyncio.sleep(0.01)  # until the subscription is registered
            assert (await asyncio.wait_for(call.read(), TIMEOUT)).body == b"x"
            call.cancel()
            bad = subscribe(broker_pb2.SubscribeRequest(topic="a b"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(bad.read(), TIMEOUT)
            assert isinstance(error_from_rpc(caught.value), BadRequest)
    finally:
        await server.stop(None)
