"""The events building block: durable, ordered, replayable topics with consumer groups.

``backend.EventsBackend`` is the engine interface the gRPC services
(``service.StreamHandler``, ``service.EventsStoreHandler``) call. The embedded
engines share one delivery engine (``engine.EmbeddedEvents``) over a storage
log: ``memory.MemoryEvents`` (tests) and ``sqlite.SQLiteEvents`` (default).
"""
