"""The agent's network setup, against a real kernel: a namespace the test makes stands in
for the guest, veths for its NICs (the agent finds NICs by MAC, whatever drives them)."""
from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent import network
from agent.errors import DeadlineError, GuestError, InvalidArgumentError
from agent.process import Reaper
from agent.runtime import run_program
from proto.gen import agent_pb2 as pb

MAC_A, MAC_B = "02:00:00:aa:00:01", "02:00:00:aa:00:02"


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    """The agent's reaper (it collects every child of this process while it runs)."""
    collector = Reaper()
    collector.start()
    yield collector
    collector.stop()


def ip_in(ns: str, reaper: Reaper) -> network.IpRunner:
    """The agent's way of running ip, in the test's namespace instead of the guest's."""
    async def run_ip(args: list[str], stdin: int | None) -> str:
        return await run_program(reaper, [network.IP, "-n", ns, *args], network.IP_TIMEOUT_S,
                                 f"{network.IP} {args[0]}", stdin=stdin)
    return run_ip


def links_in(ns: str) -> network.LinkLister:
    """What sysfs shows the agent, for a namespace the test process is not in."""
    def listing() -> dict[str, str]:
        return {link["address"]: link["ifname"] for link in json.loads(_ip(ns, "-j", "link"))}
    return listing


@pytest.fixture
def guest_ns() -> Iterator[str]:
    """A namespace whose kernel named the NICs the other way round from CNI."""
    name = f"husk-ut-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _ip(name, "link", "add", "eth0", "address", MAC_B, "type", "veth", "peer", "name",
            "eth1", "address", MAC_A)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _config() -> pb.NetworkConfig:
    return pb.NetworkConfig(
        interfaces=[
            pb.Interface(name="eth0", mac=MAC_A, mtu=1400, addresses=[
                pb.IPAddress(address="10.88.0.5", prefix_len=16),
                pb.IPAddress(address="fd00:88::5", prefix_len=64)]),
            pb.Interface(name="net1", mac=MAC_B, mtu=9000, addresses=[
                pb.IPAddress(address="10.99.0.7", prefix_len=24)])],
        routes=[
            pb.Route(destination="169.254.1.1/32", device="net1", scope=253),
            pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1", device="eth0"),
            pb.Route(destination="::/0", gateway="fd00:88::1", device="eth0"),
            # A gateway outside every prefix of its device: needs onlink.
            pb.Route(destination="192.168.50.0/24", gateway="172.16.0.1", device="net1")],
        neighbors=[pb.Neighbor(ip="10.88.0.9", mac="02:00:00:bb:00:09", device="eth0")])


async def test_interfaces_routes_and_neighbours_are_applied(guest_ns: str, reaper: Reaper) -> None:
    config = _config()
    network.check(config)
    await network.configure(config, 5.0, ip_in(guest_ns, reaper), links_in(guest_ns))
    links = {link["ifname"]: link for link in json.loads(_ip(guest_ns, "-j", "addr"))}
    assert links["eth0"]["address"] == MAC_A and links["eth0"]["mtu"] == 1400
    assert links["net1"]["address"] == MAC_B and links["net1"]["mtu"] == 9000
    addrs = {(a["local"], a["prefixlen"]) for a in links["eth0"]["addr_info"]}
    assert {("10.88.0.5", 16), ("fd00:88::5", 64)} <= addrs
    v6 = next(a for a in links["eth0"]["addr_info"] if a["local"] == "fd00:88::5")
    assert "tentative" not in v6, "DAD ran on an address CNI already checked"
    routes = _ip(guest_ns, "route").splitlines()
    assert any(r.startswith("default via 10.88.0.1 dev eth0") for r in routes)
    assert any(r.startswith("192.168.50.0/24 via 172.16.0.1 dev net1") and "onlink" in r
               for r in routes)
    assert "default via fd00:88::1 dev eth0" in _ip(guest_ns, "-6", "route")
    assert "10.88.0.9 dev eth0 lladdr 02:00:00:bb:00:09 PERMANENT" in _ip(guest_ns, "neigh")


async def test_a_nic_that_never_comes_is_named(reaper: Reaper) -> None:
    name = f"husk-ut-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        config = pb.NetworkConfig(interfaces=[pb.Interface(name="eth0", mac=MAC_A, mtu=1500)])
        with pytest.raises(DeadlineError, match=MAC_A):
            await network.configure(config, 0.2, ip_in(name, reaper), links_in(name))
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


async def test_what_the_kernel_refuses_is_named_and_nothing_after_it_runs(
        guest_ns: str, reaper: Reaper) -> None:
    config = _config()
    # The same address twice: the second is refused.
    config.interfaces[1].addresses.append(pb.IPAddress(address="10.99.0.7", prefix_len=24))
    network.check(config)
    with pytest.raises(GuestError, match=r"^network: net1 address 10\.99\.0\.7/24: ipv4: Address already assigned\.$"):
        await network.configure(config, 5.0, ip_in(guest_ns, reaper), links_in(guest_ns))
    links = {link["ifname"]: link for link in json.loads(_ip(guest_ns, "-j", "link"))}
    assert links["net1"]["operstate"] == "DOWN" and "UP" not in links["net1"]["flags"]
    assert "default" not in _ip(guest_ns, "route")  # the routes come after the refusal


def test_links_are_read_from_sysfs(tmp_path: Path) -> None:
    for name, address in (("eth0", "02:00:00:AA:00:01\n"), ("lo", "00:00:00:00:00:00\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(address)
    (tmp_path / "gone").mkdir()  # removed between the listing and the read: skipped
    assert network.sysfs_links(tmp_path) == {MAC_A: "eth0", "00:00:00:00:00:00": "lo"}
    with pytest.raises(GuestError, match="cannot list"):
        network.sysfs_links(tmp_path / "missing")


@pytest.mark.parametrize("bad", [
    pb.NetworkConfig(interfaces=[pb.Interface(name="../../x", mac=MAC_A, mtu=1500)]),
    pb.NetworkConfig(interfaces=[pb.Interface(name="eth0", mac="02:00", mtu=1500)]),
    pb.NetworkConfig(interfaces=[pb.Interface(name="eth0", mac=MAC_A, mtu=10)]),
    pb.NetworkConfig(interfaces=[pb.Interface(name="eth0", mac=MAC_A, mtu=1500, addresses=[
        pb.IPAddress(address="10.0.0.1", prefix_len=33)])]),
    pb.NetworkConfig(interfaces=[pb.Interface(name="eth0", mac=MAC_A, mtu=1500)],
                     routes=[pb.Route(destination="0.0.0.0/0", gateway="fd00::1", device="eth0")]),
    pb.NetworkConfig(routes=[pb.Route(destination="0.0.0.0/0", device="eth9")]),
    pb.NetworkConfig(interfaces=[pb.Interface(name=f"e{i}", mac=f"02:00:00:00:00:{i:02x}", mtu=1500)
                                 for i in range(network.MAX_INTERFACES + 1)]),
])
def test_malformed_requests_are_refused(bad: pb.NetworkConfig) -> None:
    with pytest.raises(InvalidArgumentError):
        network.check(bad)
