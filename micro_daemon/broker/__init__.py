"""The broker building block: ephemeral publish/subscribe, per namespace.

``backend.BrokerBackend`` is the engine interface the gRPC service
(``service.BrokerHandler``) calls; ``memory.MemoryBroker`` is the in-process
engine. Nothing is stored: a message nobody subscribes to is dropped.
"""
