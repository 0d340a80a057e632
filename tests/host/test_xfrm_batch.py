"""A Child SA's batched install against the real host kernel, in fresh namespaces.

The host kernel has XFRM netlink but no ESP: it refuses every ESP SA (the QEMU tier
installs real ones) and takes policies. That makes the refusal itself the failure case:
one send carries SA in, SA out and three policies; the kernel takes the policies and
refuses both SAs; the datapath must name the SA and take the policies out again, and a
failed rekey must leave the old Child SA's policies as they were. A multicast listener
on the namespace's XFRM groups sees what the kernel did, in order.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct

import pytest

from oe_router.datapath import xfrm_msg as X
from oe_router.datapath.base import (
    ChildSaSpec,
    FeatureMissing,
    SaKeys,
    child_policies,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.kernel import XfrmDatapath
from oe_router.datapath.netns import in_netns
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip

pytestmark = pytest.mark.host

LOCAL = ipaddress.ip_address("203.0.113.2")
NETLINK_XFRM = 6


def _spec(i: int, reqid: int) -> ChildSaSpec:
    """AES-CBC + HMAC-SHA2-256: the algorithms the host kernel has, so the SAs get as
    far as the ESP type lookup."""
    return ChildSaSpec(
        LOCAL,
        ipaddress.ip_address(f"192.0.2.{i}"),
        SaKeys(0xC0000100 + 2 * i, bytes(range(32)), bytes(range(32, 64))),
        SaKeys(0xC0000101 + 2 * i, bytes(range(64, 96)), bytes(range(96, 128))),
        encr_algorithm(12),
        integ_algorithm(12),
        reqid=reqid,
        policy_priority=100,
    )


def _listener(netns: str) -> socket.socket:
    """A socket on the namespace's XFRM SA and policy multicast groups."""
    with in_netns(netns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    groups = (1 << (X.XFRMNLGRP_SA - 1)) | (1 << (X.XFRMNLGRP_POLICY - 1))
    s.bind((0, groups))
    s.setblocking(False)
    return s


def _events(s: socket.socket) -> list[int]:
    """Message types of every notification waiting (the kernel sends them inside the
    request's send, so they are all queued by the time install_child_sa returns)."""
    out: list[int] = []
    while True:
        try:
            data = s.recv(1 << 16)
        except BlockingIOError:
            return out
        off = 0
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            out.append(mtype)
            off += (length + 3) & ~3


def _reqids(netns: str) -> list[str]:
    return [
        line.split("reqid ")[1].split()[0]
        for line in _ip("-n", netns, "xfrm", "policy").splitlines()
        if "reqid" in line
    ]


def test_refused_sas_name_the_sa_and_leave_no_policy(make_netns: MakeNetns) -> None:
    netns = make_netns("oe-xbatch")
    listener = _listener(netns)

    async def body() -> str:
        dp = XfrmDatapath(netns=netns)
        try:
            with pytest.raises(FeatureMissing) as info:
                await dp.install_child_sa(_spec(7, dp.ownership.reqid_min + 7))
            assert info.value.errno == errno.EPROTONOSUPPORT
            assert dp.stats() == {"policies": 0}
            return str(info.value)
        finally:
            await dp.close()

    msg = asyncio.run(body())
    assert msg.startswith(
        "kernel lacks ESP (esp4/esp6 module): cannot install SA in 192.0.2.7->203.0.113.2 "
        "spi 0xc000010e (AES_CBC)"
    ), msg
    assert (
        "[also refused: SA out 203.0.113.2->192.0.2.7 spi 0xc000010f (AES_CBC) (EPROTONOSUPPORT)]"
        in msg
    )
    assert "\\x" not in msg and "0001020304" not in msg  # no key material in the error
    # the kernel took the three policies from the same send, then the rollback's deletes
    assert _events(listener) == [X.XFRM_MSG_UPDPOLICY] * 3 + [X.XFRM_MSG_DELPOLICY] * 3
    listener.close()
    assert _ip("-n", netns, "xfrm", "policy").strip() == ""
    assert _ip("-n", netns, "xfrm", "state").strip() == ""


def test_the_real_kernel_answers_failures_and_the_last_message_only(
    make_netns: MakeNetns,
) -> None:
    """What _commit infers success from, checked on the real kernel: in one send of three
    policies, two refused SAs and one more policy (only the last asking for an ACK), the
    refused SAs are answered with their errno, the policies count as in, and they are."""
    from oe_router.datapath.kernel import _PolicyTag, add_child_sas, add_policy

    netns = make_netns("oe-xacks")
    dp = XfrmDatapath(netns=netns)
    try:
        spec = _spec(9, dp.ownership.reqid_min + 9)
        batch = dp._batch()
        dp._child_policies_into(batch, spec)
        add_child_sas(batch, spec, False, False, ("in", "out"))
        extra = child_policies(_spec(10, dp.ownership.reqid_min + 10))[0]
        add_policy(batch, extra, dp.ownership, _PolicyTag(extra))
        acks = dp._commit(batch)
    finally:
        asyncio.run(dp.close())
    assert [a.errno for a in acks] == [0, 0, 0, errno.EPROTONOSUPPORT, errno.EPROTONOSUPPORT, 0]
    assert _ip("-n", netns, "xfrm", "policy", "count").split("\n")[0].split() == [
        "SPD",
        "IN",
        "1",
        "OUT",
        "2",
        "FWD",
        "1",
    ]


def test_failed_rekey_leaves_the_old_policies(make_netns: MakeNetns) -> None:
    """The old Child SA's policies are in (as after its install); the new Child SA for
    the same selectors fails: the policies carry the old reqid again, none is missing."""
    netns = make_netns("oe-xbatch")

    async def body() -> tuple[list[str], int]:
        dp = XfrmDatapath(netns=netns)
        old = _spec(9, dp.ownership.reqid_min + 1)
        for pol in child_policies(old):
            await dp.install_policy(pol)
        listener = _listener(netns)
        with pytest.raises(FeatureMissing, match=r"cannot install SA in 192\.0\.2\.9"):
            await dp.install_child_sa(_spec(9, dp.ownership.reqid_min + 2))
        events = _events(listener)
        listener.close()
        reqids = _reqids(netns)
        assert dp.stats() == {"policies": 3}
        await dp.close()
        assert _ip("-n", netns, "xfrm", "policy").strip() == ""  # close() removes ours
        return reqids, len(events)

    reqids, events = asyncio.run(body())
    assert reqids == [str(0x4F450001)] * 3
    assert events == 6  # 3 updates to the new reqid, 3 back to the old one


def test_many_child_sa_installs_stay_clean(make_netns: MakeNetns) -> None:
    """Fifty refused installs in a row: each error names its own SA, the socket's
    sequence numbers keep ACKs apart, and the kernel ends with nothing."""
    netns = make_netns("oe-xbatch")

    async def body() -> list[str]:
        dp = XfrmDatapath(netns=netns)
        msgs = []
        for i in range(1, 51):
            with pytest.raises(FeatureMissing) as info:
                await dp.install_child_sa(_spec(i, dp.ownership.reqid_min + i))
            msgs.append(str(info.value))
        await dp.close()
        return msgs

    msgs = asyncio.run(body())
    for i, msg in enumerate(msgs, 1):
        assert f"SA in 192.0.2.{i}->203.0.113.2 spi {0xC0000100 + 2 * i:#010x}" in msg
    assert _ip("-n", netns, "xfrm", "policy").strip() == ""
    assert _ip("-n", netns, "xfrm", "state").strip() == ""
