"""XfrmDatapath against the real host kernel, each test in a fresh network namespace.

The host kernel has XFRM netlink but no ESP: policies, SPI allocation,
ACQUIRE and socket bypass work here; installing an ESP SA must fail with a
clear message (real SAs are exercised in the QEMU tier).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    Datapath,
    DatapathError,
    Direction,
    FeatureMissing,
    Lifetime,
    Mode,
    PolicyAction,
    PolicySpec,
    SaKeys,
    Template,
    TrafficSelector,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.kernel import XfrmDatapath, bypass_socket, enable_esp_in_udp
from oe_router.datapath.netns import in_netns
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip

pytestmark = pytest.mark.host

LOCAL = ipaddress.ip_address("10.0.0.1")
PEER = ipaddress.ip_address("192.0.2.7")
LOCAL6 = ipaddress.ip_address("2001:db8:1::1")
PEER6 = ipaddress.ip_address("2001:db8:2::7")


def _ipn(netns: str, command: str) -> str:
    """Run `ip -n NETNS <command words>`."""
    return _ip("-n", netns, *command.split())


@pytest.fixture
def netns(make_netns: MakeNetns) -> str:
    """A fresh namespace with a veth whose routes reach the documentation prefixes."""
    name = make_netns("oe-xfrm")
    _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    _ip("-n", name, "link", "set", "v0", "up")
    _ip("-n", name, "link", "set", "v1", "up")
    _ip("-n", name, "addr", "add", "10.0.0.1/24", "dev", "v0")
    _ip("-n", name, "route", "add", "192.0.2.0/24", "dev", "v0")
    _ip("-n", name, "-6", "addr", "add", "2001:db8:1::1/64", "dev", "v0", "nodad")
    _ip("-n", name, "-6", "route", "add", "2001:db8:2::/64", "dev", "v0")
    return name


def _ts(net: str, proto: int = 0, port: int | None = None) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(net), proto, port)


def _trap(
    dp: XfrmDatapath,
    src: str,
    dst: str,
    peer: ipaddress._BaseAddress,
    rank: int = 10,
    local: ipaddress._BaseAddress = LOCAL,
) -> PolicySpec:
    tmpl = Template(local, peer, dp.ownership.reqid_min + 1)  # type: ignore[arg-type]
    return PolicySpec(_ts(src), _ts(dst), Direction.OUT, PolicyAction.TRAP, rank, (tmpl,))


def test_xfrm_datapath_satisfies_the_protocol(netns: str) -> None:
    dp = XfrmDatapath(netns=netns, reason="test")
    try:
        assert isinstance(dp, Datapath)
        assert dp.name == "kernel-xfrm"
        assert dp.reason == "test"
    finally:
        asyncio.run(dp.close())


def test_policy_add_dump_delete_matches_ip_xfrm(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        trap = _trap(dp, "10.0.0.1/32", "192.0.2.0/24", PEER)
        drop = PolicySpec(
            _ts("10.0.0.1/32"),
            _ts("198.51.100.0/24", 6, 443),
            Direction.OUT,
            PolicyAction.DROP,
            3,
            persistent=True,
        )
        pass6 = PolicySpec(
            _ts("2001:db8:1::1/128"),
            _ts("2001:db8:3::/48"),
            Direction.OUT,
            PolicyAction.PASS,
            7,
            lifetime=Lifetime(hard_seconds=900),
        )
        trap6 = _trap(dp, "2001:db8:1::1/128", "2001:db8:2::/64", PEER6, 11, LOCAL6)
        for p in (trap, drop, pass6, trap6):
            await dp.install_policy(p)
        text = _ip("-n", netns, "xfrm", "policy")
        # what ip(8) prints about our objects
        prio = dp.ownership.kernel_priority
        assert f"src 10.0.0.1/32 dst 192.0.2.0/24 \n\tdir out priority {prio(10, False)}" in text
        reqid = dp.ownership.reqid_min + 1
        assert f"tmpl src 10.0.0.1 dst 192.0.2.7\n\t\tproto esp reqid {reqid} mode tunnel" in text
        assert "dst 198.51.100.0/24 proto tcp dport 443" in text
        assert f"dir out action block priority {prio(3, True)}" in text
        assert "src 2001:db8:1::1/128 dst 2001:db8:3::/48" in text
        assert "tmpl src 2001:db8:1::1 dst 2001:db8:2::7" in text
        lft = _ipn(netns, "-s xfrm policy get src 2001:db8:1::1/128 dst 2001:db8:3::/48 dir out")
        assert "expire add: soft 0(sec), hard 900(sec)" in lft
        dumped = {p for _, p in dp.dump_policies() if p is not None}
        assert {drop, pass6} <= dumped
        # a trap and an ipsec policy are the same kernel object; it reads back as IPSEC
        assert (
            PolicySpec(
                trap.src,
                trap.dst,
                trap.direction,
                PolicyAction.IPSEC,
                trap.priority,
                trap.templates,
            )
            in dumped
        )
        for p in (trap, drop, pass6, trap6):
            await dp.remove_policy(p)
        assert _ip("-n", netns, "xfrm", "policy").strip() == ""
        assert [p for _, p in dp.dump_policies()] == []
        await dp.remove_policy(trap)  # absent: not an error
        await dp.close()

    asyncio.run(body())


def test_policy_update_replaces_in_place(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        trap = _trap(dp, "10.0.0.1/32", "192.0.2.7/32", PEER)
        await dp.install_policy(trap)
        shunt = PolicySpec(
            trap.src,
            trap.dst,
            Direction.OUT,
            PolicyAction.PASS,
            10,
            lifetime=Lifetime(hard_seconds=60),
        )
        await dp.install_policy(shunt)
        ours = [p for _, p in dp.dump_policies() if p is not None]
        assert ours == [shunt]
        await dp.close()
        assert _ip("-n", netns, "xfrm", "policy").strip() == ""

    asyncio.run(body())


def test_policies_in_one_batch_each_go_in_or_are_named(netns: str) -> None:
    """``install_policies``: one send; a policy the kernel refuses (a transport-mode
    template of another family than its selector) is named, the others are in."""

    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        trap = _trap(dp, "10.0.0.1/32", "192.0.2.0/24", PEER)
        bad_tmpl = Template(LOCAL6, PEER6, dp.ownership.reqid_min + 2, Mode.TRANSPORT)
        bad = PolicySpec(
            _ts("10.0.0.1/32"),
            _ts("192.0.2.9/32"),
            Direction.OUT,
            PolicyAction.IPSEC,
            5,
            (bad_tmpl,),
        )
        clear = [
            PolicySpec(
                _ts("10.0.0.1/32"), _ts(f"198.51.100.{i}/32"), Direction.OUT, PolicyAction.PASS, 7
            )
            for i in range(30)
        ]
        with pytest.raises(DatapathError, match=r"192\.0\.2\.9") as refusal:
            await dp.install_policies([trap, bad, *clear])
        assert "also refused" not in str(refusal.value)
        assert dp.stats()["policies"] == 31 == _kernel_policy_count(netns)
        ours = {p for _, p in dp.dump_policies() if p is not None}
        assert set(clear) <= ours and not any(p.dst == bad.dst for p in ours)
        await dp.install_policies(clear)  # again: each replaced in place
        assert _kernel_policy_count(netns) == 31
        await dp.close()
        assert _ip("-n", netns, "xfrm", "policy").strip() == ""

    asyncio.run(body())


def test_flush_owned_leaves_foreign_objects(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        _ipn(
            netns,
            "xfrm policy add src 10.0.0.1/32 dst 203.0.113.0/24 dir out priority 100 action block",
        )
        _ipn(netns, "xfrm state allocspi src 192.0.2.9 dst 10.0.0.1 proto esp reqid 7")
        await dp.install_policy(_trap(dp, "10.0.0.1/32", "192.0.2.0/24", PEER))
        spi = await dp.allocate_spi(LOCAL, PEER, dp.ownership.reqid_min + 1)
        assert spi >= 0xC0000000
        state = _ip("-n", netns, "xfrm", "state")
        assert f"spi {spi:#010x} reqid {dp.ownership.reqid_min + 1}" in state
        removed = await dp.flush_owned()
        assert removed == 2
        pol = _ip("-n", netns, "xfrm", "policy")
        assert "203.0.113.0/24" in pol
        assert "192.0.2.0/24" not in pol
        state = _ip("-n", netns, "xfrm", "state")
        assert "reqid 7 " in state
        assert f"{spi:#010x}" not in state
        await dp.close()

    asyncio.run(body())


def test_acquire_from_trap_policy(netns: str) -> None:
    """A UDP packet matching a trap policy makes the kernel send ACQUIRE (no ESP needed)."""

    async def body() -> Acquire:
        dp = XfrmDatapath(netns=netns)
        trap = PolicySpec(
            _ts("10.0.0.1/32"),
            _ts("192.0.2.0/24"),
            Direction.OUT,
            PolicyAction.TRAP,
            10,
            (Template(LOCAL, PEER, dp.ownership.reqid_min + 5),),
        )
        await dp.install_policy(trap)
        events = dp.events()
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # the reader is registered before the packet leaves
        with in_netns(netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # with xfrm_larval_drop=1 the kernel drops this packet silently (UDP send succeeds)
            s.sendto(b"hello", ("192.0.2.7", 5353))
        finally:
            s.close()
        ev = await asyncio.wait_for(first, 5)
        await events.aclose()
        await dp.close()
        assert isinstance(ev, Acquire)
        return ev

    ev = asyncio.run(body())
    assert ev.src == LOCAL
    assert ev.dst == PEER
    assert ev.selector_dst == _ts("192.0.2.7/32", 17, 5353)
    assert ev.selector_src.net == ipaddress.ip_network("10.0.0.1/32")
    assert ev.reqid == 0x4F450005
    assert ev.policy_priority == 0x7E000000 + 20


def test_bypass_socket_escapes_block_policy(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        await dp.install_policy(
            PolicySpec(_ts("0.0.0.0/0"), _ts("192.0.2.0/24"), Direction.OUT, PolicyAction.DROP, 1)
        )
        with in_netns(netns):
            plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            ike = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            natt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            ike6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            with pytest.raises(OSError) as info:
                plain.sendto(b"x", ("192.0.2.7", 500))
            assert info.value.errno == errno.EPERM
            bypass_socket(ike)
            assert ike.sendto(b"ike", ("192.0.2.7", 500)) == 3
            natt.bind(("10.0.0.1", 4500))
            bypass_socket(natt)
            enable_esp_in_udp(natt)
            assert natt.getsockopt(17, 100) == 2  # SOL_UDP, UDP_ENCAP -> ESPINUDP
            assert natt.sendto(b"\0\0\0\0ike", ("192.0.2.7", 4500)) == 7
            bypass_socket(ike6)
        finally:
            for s in (plain, ike, natt, ike6):
                s.close()
        with pytest.raises(DatapathError, match="socket family"):
            bypass_socket(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        await dp.close()

    asyncio.run(body())


CRASHING_RUN = """
import asyncio, ipaddress, sys, time
from oe_router.datapath.base import Direction, PolicyAction, PolicySpec, Template, TrafficSelector
from oe_router.datapath.kernel import XfrmDatapath
def ts(n): return TrafficSelector(ipaddress.ip_network(n))
async def main():
    dp = XfrmDatapath(netns=sys.argv[1])
    await dp.install_policy(PolicySpec(ts("10.0.0.1/32"), ts("198.51.100.0/24"), Direction.OUT,
                                       PolicyAction.DROP, 2, persistent=True))
    local, peer = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("192.0.2.7")
    tmpl = Template(local, peer, dp.ownership.reqid_min + 1)
    await dp.install_policy(PolicySpec(ts("10.0.0.1/32"), ts("192.0.2.0/24"), Direction.OUT,
                                       PolicyAction.TRAP, 10, (tmpl,)))
    print(await dp.allocate_spi(local, peer, dp.ownership.reqid_min + 1), flush=True)
    time.sleep(60)
asyncio.run(main())
"""


def test_reconcile_after_crash(netns: str) -> None:
    """Objects of a killed run: SAs removed, policies adopted or removed, foreign ones untouched."""

    async def body() -> None:
        _ipn(
            netns,
            "xfrm policy add src 10.0.0.1/32 dst 203.0.113.0/24 dir out priority 100 action block",
        )
        # an earlier daemon run installs objects, then dies by SIGKILL without cleanup
        old = subprocess.Popen(
            [sys.executable, "-c", CRASHING_RUN, netns], stdout=subprocess.PIPE, text=True
        )
        assert old.stdout is not None
        spi = int(old.stdout.readline())
        old.send_signal(signal.SIGKILL)
        assert old.wait() == -signal.SIGKILL
        assert f"{spi:#010x}" in _ip("-n", netns, "xfrm", "state")

        new = XfrmDatapath(netns=netns, keep_persistent_on_stop=True)
        report = await new.reconcile(adopt_policy=lambda p: p.persistent)
        assert (report.removed_sas, report.adopted_policies, report.removed_policies) == (1, 1, 1)
        assert f"{spi:#010x}" not in _ip("-n", netns, "xfrm", "state")
        pol = _ip("-n", netns, "xfrm", "policy")
        assert "198.51.100.0/24" in pol and "203.0.113.0/24" in pol
        assert "192.0.2.0/24" not in pol
        # clean stop keeps the adopted "private" block policy
        await new.close()
        pol = _ip("-n", netns, "xfrm", "policy")
        assert "198.51.100.0/24" in pol

        # a run configured not to keep them removes it at stop
        last = XfrmDatapath(netns=netns, keep_persistent_on_stop=False)
        report = await last.reconcile()
        assert report.adopted_policies == 1
        await last.close()
        pol = _ip("-n", netns, "xfrm", "policy")
        assert "198.51.100.0/24" not in pol
        assert "203.0.113.0/24" in pol

    asyncio.run(body())


def _esp_in_kernel() -> bool:
    return any(os.path.exists(f"/sys/module/{m}") for m in ("esp4", "esp6"))


@pytest.mark.skipif(_esp_in_kernel(), reason="this kernel has ESP; see tests/qemu")
def test_esp_sa_install_fails_clearly_on_kernel_without_esp(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        cbc = ChildSaSpec(
            LOCAL,
            PEER,
            SaKeys(0x1001, bytes(16), bytes(32)),
            SaKeys(0x2002, bytes(16), bytes(32)),
            encr_algorithm(12),
            integ_algorithm(12),
        )
        with pytest.raises(FeatureMissing) as info:
            await dp.install_child_sa(cbc)
        msg = str(info.value)
        assert msg.startswith("kernel lacks ESP (esp4/esp6 module): cannot install SA ")
        assert "192.0.2.7->10.0.0.1 spi 0x00001001" in msg
        assert info.value.errno == errno.EPROTONOSUPPORT
        gcm = ChildSaSpec(
            LOCAL, PEER, SaKeys(0x1001, bytes(20)), SaKeys(0x2002, bytes(20)), encr_algorithm(20)
        )
        with pytest.raises(FeatureMissing, match=r"kernel lacks crypto algorithm rfc4106"):
            await dp.install_child_sa(gcm)
        # nothing half-installed: no SA, no policy
        assert dp.dump_sas() == []
        assert _ip("-n", netns, "xfrm", "policy").strip() == ""
        await dp.close()

    asyncio.run(body())


@pytest.mark.skipif(_esp_in_kernel(), reason="this kernel has ESP; see tests/qemu")
@pytest.mark.parametrize(("integ_id", "key_bytes"), [(13, 48), (14, 64)])
def test_hmac_sha384_sha512_pass_the_kernels_algorithm_checks(
    netns: str, integ_id: int, key_bytes: int
) -> None:
    """HMAC-SHA2-384-192 / -512-256 (RFC 4868) as XFRMA_ALG_AUTH_TRUNC: the kernel finds
    the algorithm and takes the truncation (it refuses one longer than the hash, proven
    below), so the only thing missing here is ESP itself, as for every SA on this host."""
    integ = integ_algorithm(integ_id)
    keys = (
        SaKeys(0x1001, bytes(32), bytes(key_bytes)),
        SaKeys(0x2002, bytes(32), bytes(key_bytes)),
    )

    async def install(spec: ChildSaSpec) -> str:
        dp = XfrmDatapath(netns=netns)
        try:
            with pytest.raises(DatapathError) as info:
                await dp.install_child_sa(spec)
            assert dp.dump_sas() == []
        finally:
            await dp.close()
        return str(info.value)

    ok = ChildSaSpec(LOCAL, PEER, *keys, encr_algorithm(12), integ)
    msg = asyncio.run(install(ok))
    assert msg.startswith("kernel lacks ESP (esp4/esp6 module)"), msg
    assert "Requested type not found" in msg  # the ESP type: the algorithm was found
    too_long = replace(integ, trunc_bits=integ.key_bits + 64)
    msg = asyncio.run(install(ChildSaSpec(LOCAL, PEER, *keys, encr_algorithm(12), too_long)))
    assert "EINVAL (kernel says: Invalid length requested for truncated ICV)" in msg, msg


def test_counters_of_a_larval_sa(netns: str) -> None:
    async def body() -> None:
        dp = XfrmDatapath(netns=netns)
        spi = await dp.allocate_spi(LOCAL, PEER, dp.ownership.reqid_min + 2)
        info = dp.get_sa(PEER, LOCAL, spi)
        assert (info.spi, info.reqid, info.counters.bytes) == (spi, 0x4F450002, 0)
        with pytest.raises(DatapathError, match=r"SA 192\.0\.2\.7->10\.0\.0\.1 spi 0x00000bad"):
            dp.get_sa(PEER, LOCAL, 0xBAD)
        await dp.close()
        assert _ip("-n", netns, "xfrm", "state").strip() == ""

    asyncio.run(body())


def _kernel_policy_count(netns: str) -> int:
    """Main-type policies in the namespace (``ip xfrm policy count``'s first SPD line)."""
    words = _ipn(netns, "xfrm policy count").split()
    return sum(int(words[i + 1]) for i, w in enumerate(words[:6]) if w in ("IN", "OUT", "FWD"))


def test_stats_count_the_policies_the_kernel_holds(netns: str) -> None:
    """``policies`` in ``oe status`` (the datapath's stats) is the kernel's own count of
    our XFRM policies: a policy table's group policies installed, some removed, and the
    "private" ones a stop keeps, adopted by the next run."""
    from oe_router.config import parse_config
    from oe_router.oe.policy import PolicyTable

    clear = "".join(f"\tlist dest '203.0.113.{i}'\n" for i in range(20))
    private = "".join(f"\tlist dest '198.51.100.{i}'\n" for i in range(5))
    config = parse_config(
        f"config policy\n\toption group 'clear'\n{clear}"
        f"\nconfig policy\n\toption group 'private'\n{private}"
    )
    table = PolicyTable.from_config(config.policy, lan=[ipaddress.ip_network("10.0.0.0/24")])
    specs = table.kernel_policies({4: LOCAL, 6: LOCAL6}, trap_reqid=1)
    kept = [p for p in specs if p.persistent]

    async def body() -> None:
        dp = XfrmDatapath(netns=netns, keep_persistent_on_stop=True)
        assert dp.stats() == {"policies": 0}
        for p in specs:
            await dp.install_policy(p)
        assert dp.stats()["policies"] == len(specs) == _kernel_policy_count(netns) > 60
        removed = [p for p in specs if not p.persistent][:9]
        for p in removed:
            await dp.remove_policy(p)
        assert dp.stats()["policies"] == len(specs) - 9 == _kernel_policy_count(netns)
        await dp.close()  # the "private" traps stay
        assert _kernel_policy_count(netns) == len(kept) == 5

        again = XfrmDatapath(netns=netns, keep_persistent_on_stop=False)
        assert again.stats()["policies"] == 0
        await again.reconcile(adopt_policy=lambda p: p.persistent)
        assert again.stats()["policies"] == 5 == _kernel_policy_count(netns)
        await again.close()
        assert _kernel_policy_count(netns) == 0

    asyncio.run(body())
