"""The registry building block: which services run, where, and what they expose.

``backend.RegistryBackend`` is the engine interface the gRPC service calls;
``memory.MemoryRegistry`` is the in-process engine.
"""
