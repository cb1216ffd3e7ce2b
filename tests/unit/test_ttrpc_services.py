"""ttrpc dispatch without sockets: registry, Call context, exception → status."""
from __future__ import annotations

import asyncio
import logging

import pytest
from google.protobuf import empty_pb2

from proto.gen import ttrpc_pb2
from proto.gen.containerd.task.v2 import shim_pb2
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.services import (
    DURATION_BUCKETS_S,
    UNREGISTERED,
    Call,
    MethodStats,
    ServiceRegistry,
    current_call,
    method_attribute,
    status_from_exception,
)

TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]


def request(method: str, message: object = None, **kw: object) -> ttrpc_pb2.Request:
    if message is not None:
        kw["payload"] = message.SerializeToString()  # type: ignore[attr-defined]
    return ttrpc_pb2.Request(service=TASK.full_name, method=method, **kw)  # type: ignore[arg-type]


class Task:
    """Implements a few Task RPCs; the rest must come out Unimplemented."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def state(self, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        self.calls.append(current_call())
        return shim_pb2.StateResponse(id=req.id, pid=4242)

    async def close_io(self, req: shim_pb2.CloseIORequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def kill(self, req: shim_pb2.KillRequest) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse()  # wrong type on purpose


def test_method_attribute_names() -> None:
    assert [method_attribute(n) for n in ("CloseIO", "ResizePty", "Wait", "GetOOMEvent")] == [
        "close_io", "resize_pty", "wait", "get_oom_event"]


def test_register_service_maps_rpcs_by_snake_case_and_reports_missing() -> None:
    registry = ServiceRegistry()
    missing = registry.register_service(TASK, Task())
    assert registry.methods == ["containerd.task.v2.Task/CloseIO",
                                "containerd.task.v2.Task/Kill", "containerd.task.v2.Task/State"]
    assert "Wait" in missing and "State" not in missing and len(missing) == 14
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TASK.full_name, "State", shim_pb2.StateRequest, Task().state)


async def test_handle_decodes_calls_and_encodes() -> None:
    task = Task()
    registry = ServiceRegistry()
    registry.register_service(TASK, task)
    req = request("State", shim_pb2.StateRequest(id="c1"), metadata=[
        ttrpc_pb2.KeyValue(key="k", value="a"), ttrpc_pb2.KeyValue(key="k", value="b")])
    call = Call.from_request(req, 1, asyncio.get_running_loop().time())
    response = await registry.handle(req, call)
    assert response.status.code == Code.OK
    assert shim_pb2.StateResponse.FromString(response.payload) == shim_pb2.StateResponse(id="c1", pid=4242)
    assert task.calls[0].metadata == {"k": ["a", "b"]} and task.calls[0].get("k") == "a"
    assert task.calls[0].deadline is None


async def test_unknown_method_and_service_are_unimplemented() -> None:
    registry = ServiceRegistry()
    registry.register_service(TASK, Task())
    response = await registry.handle(request("Wait"), Call(TASK.full_name, "Wait", 1))
    assert response.status.code == Code.UNIMPLEMENTED
    assert "containerd.task.v2.Task/Wait is not implemented" in response.status.message
    other = ttrpc_pb2.Request(service="no.such.Svc", method="X")
    response = await registry.handle(other, Call("no.such.Svc", "X", 3))
    assert response.status.code == Code.UNIMPLEMENTED and "not registered" in response.status.message


async def test_undecodable_payload_is_invalid_argument() -> None:
    registry = ServiceRegistry()
    registry.register_service(TASK, Task())
    response = await registry.handle(request("State", payload=b"\xff\xff"), Call("", "", 1))
    assert response.status.code == Code.INVALID_ARGUMENT
    assert "cannot decode containerd.task.v2.Task/State" in response.status.message


async def test_wrong_response_type_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    registry = ServiceRegistry()
    registry.register_service(TASK, Task())
    with caplog.at_level(logging.ERROR, logger="shim.ttrpc.services"):
        response = await registry.handle(request("Kill"), Call("", "", 1))
    assert response.status.code == Code.UNKNOWN
    assert "returned StateResponse, expected Empty" in response.status.message
    assert caplog.records and caplog.records[0].exc_info is not None


async def test_deadline_from_timeout_nano() -> None:
    now = asyncio.get_running_loop().time()
    call = Call.from_request(request("State", timeout_nano=1_500_000_000), 5, now)
    assert call.deadline == pytest.approx(now + 1.5)
    assert 0 < call.time_remaining() <= 1.5  # type: ignore[operator]


def test_current_call_outside_handler() -> None:
    with pytest.raises(RuntimeError, match="outside a ttrpc handler"):
        current_call()


@pytest.mark.parametrize("exc, code, message", [
    (TtrpcError(Code.NOT_FOUND, "container c1"), Code.NOT_FOUND, "container c1"),
    (NotImplementedError("no pause"), Code.UNIMPLEMENTED, "no pause"),
    (NotImplementedError(), Code.UNIMPLEMENTED, "not implemented"),
    (asyncio.TimeoutError("agent slow"), Code.DEADLINE_EXCEEDED, "agent slow"),
    (ValueError("bad"), Code.UNKNOWN, "bad"),
    (KeyError(), Code.UNKNOWN, "KeyError"),
])
def test_status_from_exception(exc: Exception, code: Code, message: str) -> None:
    status = status_from_exception(exc)
    assert (status.code, status.message) == (code, message)


async def test_calls_are_counted_by_method_and_status_with_their_duration() -> None:
    registry = ServiceRegistry()
    registry.register_service(TASK, Task())
    for _ in range(3):
        await registry.handle(request("State", shim_pb2.StateRequest(id="c1")), Call("", "", 1))
    await registry.handle(request("State", payload=b"\xff\xff"), Call("", "", 1))
    await registry.handle(request("NoSuchMethod"), Call("", "", 1))
    await registry.handle(request("AnotherInvention"), Call("", "", 1))
    state = registry.stats["State"]
    assert state.codes == {"OK": 3, "INVALID_ARGUMENT": 1}
    assert sum(state.buckets) == 4 and state.buckets[0] == 4, "each took under 5 ms"
    assert 0 <= state.seconds_sum < 0.02
    # Names nobody registered come from the caller: one series for all of them.
    assert set(registry.stats) == {"State", UNREGISTERED}
    assert registry.stats[UNREGISTERED].codes == {"UNIMPLEMENTED": 2}


def test_a_duration_lands_in_the_first_bucket_that_holds_it() -> None:
    stats = MethodStats()
    for seconds in (0.0, 0.005, 0.0051, 59.0, 61.0):
        stats.observe(Code.OK, seconds)
    assert stats.buckets[0] == 2                      # le 0.005 (Prometheus' le is inclusive)
    assert stats.buckets[1] == 1                      # le 0.01
    assert stats.buckets[len(DURATION_BUCKETS_S) - 1] == 1  # le 60
    assert stats.buckets[-1] == 1                     # +Inf
