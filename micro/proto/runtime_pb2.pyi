from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[Status]
    PENDING: _ClassVar[Status]
    BUILDING: _ClassVar[Status]
    STARTING: _ClassVar[Status]
    RUNNING: _ClassVar[Status]
    STOPPING: _ClassVar[Status]
    STOPPED: _ClassVar[Status]
    ERROR: _ClassVar[Status]
UNKNOWN: Status
PENDING: Status
BUILDING: Status
STARTING: Status
RUNNING: Status
STOPPING: Status
STOPPED: Status
ERROR: Status

class Service(_message.Message):
    __slots__ = ("name", "version", "source", "metadata", "status")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    source: str
    metadata: _containers.ScalarMap[str, str]
    status: Status
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., status: _Optional[_Union[Status, str]] = ...) -> None: ...

class CreateOptions(_message.Message):
    __slots__ = ("env", "instances", "force", "watch", "entrypoint", "namespace")
    ENV_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    env: _containers.RepeatedScalarFieldContainer[str]
    instances: int
    force: bool
    watch: bool
    entrypoint: str
    namespace: str
    def __init__(self, env: _Optional[_Iterable[str]] = ..., instances: _Optional[int] = ..., force: _Optional[bool] = ..., watch: _Optional[bool] = ..., entrypoint: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class CreateRequest(_message.Message):
    __slots__ = ("service", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: Service
    options: CreateOptions
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ..., options: _Optional[_Union[CreateOptions, _Mapping]] = ...) -> None: ...

class CreateResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: Service
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class ReadOptions(_message.Message):
    __slots__ = ("service", "version", "namespace")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    namespace: str
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("options",)
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    options: ReadOptions
    def __init__(self, options: _Optional[_Union[ReadOptions, _Mapping]] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class UpdateOptions(_message.Message):
    __slots__ = ("namespace", "source", "instances")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    source: str
    instances: int
    def __init__(self, namespace: _Optional[str] = ..., source: _Optional[str] = ..., instances: _Optional[int] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("service", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: Service
    options: UpdateOptions
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ..., options: _Optional[_Union[UpdateOptions, _Mapping]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: Service
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class DeleteOptions(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("service", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: Service
    options: DeleteOptions
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ..., options: _Optional[_Union[DeleteOptions, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogsOptions(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("service", "stream", "count", "since", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    stream: bool
    count: int
    since: int
    options: LogsOptions
    def __init__(self, service: _Optional[str] = ..., stream: _Optional[bool] = ..., count: _Optional[int] = ..., since: _Optional[int] = ..., options: _Optional[_Union[LogsOptions, _Mapping]] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("timestamp", "metadata", "message")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    metadata: _containers.ScalarMap[str, str]
    message: str
    def __init__(self, timestamp: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., message: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("service", "data")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    service: str
    data: bytes
    def __init__(self, service: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
