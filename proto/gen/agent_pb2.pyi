from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STDOUT: _ClassVar[OutputStream]
    STDERR: _ClassVar[OutputStream]
STDOUT: OutputStream
STDERR: OutputStream

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Storage(_message.Message):
    __slots__ = ("driver", "source", "fstype", "options", "mount_point", "create_filesystem")
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    CREATE_FILESYSTEM_FIELD_NUMBER: _ClassVar[int]
    driver: str
    source: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    mount_point: str
    create_filesystem: bool
    def __init__(self, driver: _Optional[str] = ..., source: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., mount_point: _Optional[str] = ..., create_filesystem: _Optional[bool] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "hostname", "dns", "storages", "sysctls", "network", "random_seed", "clock_ns", "debug_console")
    class SysctlsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    SYSCTLS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    CLOCK_NS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_CONSOLE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    hostname: str
    dns: _containers.RepeatedScalarFieldContainer[str]
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    sysctls: _containers.ScalarMap[str, str]
    network: NetworkConfig
    random_seed: bytes
    clock_ns: int
    debug_console: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., hostname: _Optional[str] = ..., dns: _Optional[_Iterable[str]] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., sysctls: _Optional[_Mapping[str, str]] = ..., network: _Optional[_Union[NetworkConfig, _Mapping]] = ..., random_seed: _Optional[bytes] = ..., clock_ns: _Optional[int] = ..., debug_console: _Optional[bool] = ...) -> None: ...

class IPAddress(_message.Message):
    __slots__ = ("address", "prefix_len")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    address: str
    prefix_len: int
    def __init__(self, address: _Optional[str] = ..., prefix_len: _Optional[int] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("name", "mac", "mtu", "addresses")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    mac: str
    mtu: int
    addresses: _containers.RepeatedCompositeFieldContainer[IPAddress]
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[_Union[IPAddress, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway", "device", "source", "scope", "metric", "onlink")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ONLINK_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    device: str
    source: str
    scope: int
    metric: int
    onlink: bool
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ..., metric: _Optional[int] = ..., onlink: _Optional[bool] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("ip", "mac", "device")
    IP_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ip: str
    mac: str
    device: str
    def __init__(self, ip: _Optional[str] = ..., mac: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class NetworkConfig(_message.Message):
    __slots__ = ("interfaces", "routes", "neighbors")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class PortForwardData(_message.Message):
    __slots__ = ("port", "data")
    PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    port: int
    data: bytes
    def __init__(self, port: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "oci_spec_json", "storages", "close_stdin")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    oci_spec_json: str
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    close_stdin: bool
    def __init__(self, container_id: _Optional[str] = ..., oci_spec_json: _Optional[str] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., close_stdin: _Optional[bool] = ...) -> None: ...

class ContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id", "timeout_s")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout_s: int
    def __init__(self, container_id: _Optional[str] = ..., timeout_s: _Optional[int] = ...) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "resources_json")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    resources_json: str
    def __init__(self, container_id: _Optional[str] = ..., resources_json: _Optional[str] = ...) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process_json", "close_stdin")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process_json: str
    close_stdin: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process_json: _Optional[str] = ..., close_stdin: _Optional[bool] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("exit_status", "oom_kills")
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    oom_kills: int
    def __init__(self, exit_status: _Optional[int] = ..., oom_kills: _Optional[int] = ...) -> None: ...

class WriteStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "data")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    data: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStdinResponse(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...

class ReadOutputRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "stream")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    stream: OutputStream
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., stream: _Optional[_Union[OutputStream, str]] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TtyWinResizeRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "rows", "columns")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    rows: int
    columns: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...

class StatsContainerResponse(_message.Message):
    __slots__ = ("cpu_usage_ns", "cpu_user_ns", "cpu_system_ns", "memory_usage_bytes", "memory_limit_bytes", "memory_max_usage_bytes", "pids_current", "pids_limit", "memory_cache_bytes", "memory_rss_bytes", "oom_kills")
    CPU_USAGE_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_NS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    cpu_usage_ns: int
    cpu_user_ns: int
    cpu_system_ns: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    memory_max_usage_bytes: int
    pids_current: int
    pids_limit: int
    memory_cache_bytes: int
    memory_rss_bytes: int
    oom_kills: int
    def __init__(self, cpu_usage_ns: _Optional[int] = ..., cpu_user_ns: _Optional[int] = ..., cpu_system_ns: _Optional[int] = ..., memory_usage_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., memory_max_usage_bytes: _Optional[int] = ..., pids_current: _Optional[int] = ..., pids_limit: _Optional[int] = ..., memory_cache_bytes: _Optional[int] = ..., memory_rss_bytes: _Optional[int] = ..., oom_kills: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("pids",)
    PIDS_FIELD_NUMBER: _ClassVar[int]
    pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pids: _Optional[_Iterable[int]] = ...) -> None: ...

class OOMEvent(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("status",)
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[CheckResponse.ServingStatus]
        SERVING: _ClassVar[CheckResponse.ServingStatus]
        NOT_SERVING: _ClassVar[CheckResponse.ServingStatus]
    UNKNOWN: CheckResponse.ServingStatus
    SERVING: CheckResponse.ServingStatus
    NOT_SERVING: CheckResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CheckResponse.ServingStatus
    def __init__(self, status: _Optional[_Union[CheckResponse.ServingStatus, str]] = ...) -> None: ...

class GuestDetails(_message.Message):
    __slots__ = ("agent_version", "kernel_release", "python_version", "oci_runtime_version", "cpus", "memory_bytes")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    OCI_RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    kernel_release: str
    python_version: str
    oci_runtime_version: str
    cpus: int
    memory_bytes: int
    def __init__(self, agent_version: _Optional[str] = ..., kernel_release: _Optional[str] = ..., python_version: _Optional[str] = ..., oci_runtime_version: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ContainerMetrics(_message.Message):
    __slots__ = ("container_id", "stats")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    stats: StatsContainerResponse
    def __init__(self, container_id: _Optional[str] = ..., stats: _Optional[_Union[StatsContainerResponse, _Mapping]] = ...) -> None: ...

class GuestMetrics(_message.Message):
    __slots__ = ("memory_total_bytes", "memory_available_bytes", "memory_free_bytes", "cpu_user_ns", "cpu_system_ns", "cpu_idle_ns", "cpu_iowait_ns", "cpu_steal_ns", "load1", "load5", "load15", "online_cpus", "processes", "uptime_s", "containers")
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_IDLE_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_IOWAIT_NS_FIELD_NUMBER: _ClassVar[int]
    CPU_STEAL_NS_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    memory_total_bytes: int
    memory_available_bytes: int
    memory_free_bytes: int
    cpu_user_ns: int
    cpu_system_ns: int
    cpu_idle_ns: int
    cpu_iowait_ns: int
    cpu_steal_ns: int
    load1: float
    load5: float
    load15: float
    online_cpus: int
    processes: int
    uptime_s: float
    containers: _containers.RepeatedCompositeFieldContainer[ContainerMetrics]
    def __init__(self, memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., cpu_user_ns: _Optional[int] = ..., cpu_system_ns: _Optional[int] = ..., cpu_idle_ns: _Optional[int] = ..., cpu_iowait_ns: _Optional[int] = ..., cpu_steal_ns: _Optional[int] = ..., load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., online_cpus: _Optional[int] = ..., processes: _Optional[int] = ..., uptime_s: _Optional[float] = ..., containers: _Optional[_Iterable[_Union[ContainerMetrics, _Mapping]]] = ...) -> None: ...

class ConsoleInput(_message.Message):
    __slots__ = ("argv", "tty", "rows", "columns", "data", "close_stdin")
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    rows: int
    columns: int
    data: bytes
    close_stdin: bool
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., data: _Optional[bytes] = ..., close_stdin: _Optional[bool] = ...) -> None: ...

class ConsoleOutput(_message.Message):
    __slots__ = ("data", "exited", "exit_status", "started")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    exited: bool
    exit_status: int
    started: bool
    def __init__(self, data: _Optional[bytes] = ..., exited: _Optional[bool] = ..., exit_status: _Optional[int] = ..., started: _Optional[bool] = ...) -> None: ...

class VolumeRequest(_message.Message):
    __slots__ = ("mount_point",)
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    mount_point: str
    def __init__(self, mount_point: _Optional[str] = ...) -> None: ...

class VolumeStats(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "available_bytes", "inodes", "inodes_used", "inodes_free")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INODES_FIELD_NUMBER: _ClassVar[int]
    INODES_USED_FIELD_NUMBER: _ClassVar[int]
    INODES_FREE_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., inodes: _Optional[int] = ..., inodes_used: _Optional[int] = ..., inodes_free: _Optional[int] = ...) -> None: ...

class ResizeVolumeRequest(_message.Message):
    __slots__ = ("mount_point", "size_bytes")
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    mount_point: str
    size_bytes: int
    def __init__(self, mount_point: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class OnlineCPUMemRequest(_message.Message):
    __slots__ = ("vcpus", "min_memory_bytes")
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    vcpus: int
    min_memory_bytes: int
    def __init__(self, vcpus: _Optional[int] = ..., min_memory_bytes: _Optional[int] = ...) -> None: ...

class GuestResources(_message.Message):
    __slots__ = ("online_vcpus", "memory_bytes")
    ONLINE_VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    online_vcpus: int
    memory_bytes: int
    def __init__(self, online_vcpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...
