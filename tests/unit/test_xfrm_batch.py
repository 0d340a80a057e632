"""The XFRM fast path, sans-IO: prepared messages equal the declared encoder's bytes,
batches number their messages, ACKs map back to the object that failed, and a failed
Child SA install rolls back what went in (against an in-process fake kernel)."""

from __future__ import annotations

import errno
import ipaddress
import struct
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.datapath import kernel as K
from oe_router.datapath import xfrm_msg as X
from oe_router.datapath.base import (
    ChildSaSpec,
    DatapathError,
    Direction,
    Lifetime,
    Mark,
    Mode,
    NatTEncap,
    PolicyAction,
    PolicySpec,
    SaKeys,
    Template,
    TrafficSelector,
    child_policies,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.xfrm_batch import (
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    Ack,
    Batch,
    read_acks,
)

LOCAL4 = ipaddress.ip_address("203.0.113.2")
LOCAL6 = ipaddress.ip_address("2001:db8:1::2")
HDR = struct.Struct("=IHHII")


def _no_seq(data: bytes | bytearray) -> bytes:
    """A message with nlmsghdr flags and seq zeroed (the reference encoder leaves them 0)."""
    out = bytearray(data)
    out[6:12] = bytes(6)
    return bytes(out)


def _messages(buf: bytes | bytearray) -> list[bytes]:
    out, off = [], 0
    while off < len(buf):
        (length,) = struct.unpack_from("=I", buf, off)
        out.append(bytes(buf[off : off + length]))
        off += (length + 3) & ~3
    return out


def _ts(net: str, proto: int = 0, port: int | None = None) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(net), proto, port)


def _sa_references(spec: ChildSaSpec, update_in: bool, update_out: bool) -> list[bytes]:
    """SA in and SA out as the declared encoder writes them from sa_request."""
    return [
        X.encode(X.XFRM_MSG_UPDSA if update else X.XFRM_MSG_NEWSA, *K.sa_request(spec, *sa))
        for *sa, update in (
            (spec.remote, spec.local, spec.inbound, update_in),
            (spec.local, spec.remote, spec.outbound, update_out),
        )
    ]


@st.composite
def child_specs(draw: st.DrawFn) -> ChildSaSpec:
    v6 = draw(st.booleans())
    local = LOCAL6 if v6 else LOCAL4
    base = 0x20010DB8000200000000000000000000 if v6 else 0x0A000000
    remote = ipaddress.ip_address(base + draw(st.integers(1, 50000)))
    aead = draw(st.booleans())
    encr = encr_algorithm(20 if aead else 12)
    integ = None if aead else integ_algorithm(draw(st.sampled_from([12, 13, 14])))
    kbits = draw(st.sampled_from(encr.key_bits))
    klen = (kbits + encr.salt_bits) // 8
    ilen = integ.key_bits // 8 if integ else 0

    def keys() -> SaKeys:
        return SaKeys(
            draw(st.integers(1, 0xFFFFFFFF)),
            draw(st.binary(min_size=klen, max_size=klen)),
            draw(st.binary(min_size=ilen, max_size=ilen)),
        )

    mode = draw(st.sampled_from([Mode.TUNNEL, Mode.TRANSPORT]))
    lts: tuple[TrafficSelector, ...] = ()
    rts: tuple[TrafficSelector, ...] = ()
    if draw(st.booleans()):
        port = draw(st.one_of(st.none(), st.integers(0, 0xFFFF)))
        proto = 6 if port is not None else draw(st.sampled_from([0, 17]))
        lts = (TrafficSelector(ipaddress.ip_network(local), proto),)
        rts = (TrafficSelector(ipaddress.ip_network(remote), proto, port),)
    encap = None
    if draw(st.booleans()):
        encap = NatTEncap(draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 0xFFFF)))
    return ChildSaSpec(
        local,
        remote,
        keys(),
        keys(),
        encr,
        integ,
        mode=mode,
        local_ts=lts,
        remote_ts=rts,
        encap=encap,
        esn=draw(st.booleans()),
        replay_window=draw(st.sampled_from([0, 32, 64, 128])),
        reqid=draw(st.integers(0x4F450000, 0x4F45FFFF)),
        lifetime=draw(
            st.sampled_from([Lifetime(), Lifetime(soft_seconds=3000, hard_seconds=3600)])
        ),
        mark=draw(st.sampled_from([None, Mark(0x42), Mark(7, 0xFF)])),
        policy_priority=draw(st.integers(0, 200)),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(child_specs(), min_size=1, max_size=4))
def test_prepared_messages_equal_the_declared_encoder(specs: list[ChildSaSpec]) -> None:
    """Every message a Child SA batch holds is byte for byte what pyroute2 encodes from
    sa_request / policy_request, also when earlier specs of the same shape left their
    prototype in the cache (a field missed by the patching would show here)."""
    own = K.Ownership()
    for spec in specs:
        for update_in, update_out in ((False, False), (True, False), (False, True)):
            batch = Batch(7)
            K.add_child_sas(batch, spec, update_in, update_out, ("in", "out"))
            refs = _sa_references(spec, update_in, update_out)
            assert [_no_seq(m) for m in _messages(batch.buf)] == refs
            assert batch.tags == ["in", "out"]
        pols = child_policies(spec)
        batch = Batch(9)
        K.add_child_policies(batch, spec, own, pols, [p.direction for p in pols])
        refs = [X.encode(X.XFRM_MSG_UPDPOLICY, *K.policy_request(p, own)) for p in pols]
        assert [_no_seq(m) for m in _messages(batch.buf)] == refs
        for pol in pols:
            batch = Batch(1)
            K.add_policy(batch, pol, own, None)
            assert _no_seq(batch.buf) == X.encode(X.XFRM_MSG_UPDPOLICY, *K.policy_request(pol, own))
            batch = Batch(1)
            K.add_delete_policy(batch, pol, None)
            attrs: list[tuple[str, Any]] = []
            if pol.mark is not None:
                attrs.append(("XFRMA_MARK", {"v": pol.mark.value, "m": pol.mark.mask}))
            fields = {**K._selector(pol.src, pol.dst, "sel_"), "dir": K._DIRS[pol.direction]}
            assert _no_seq(batch.buf) == X.encode(X.XFRM_MSG_DELPOLICY, fields, attrs)
        batch = Batch(1)
        K.add_delete_sa(batch, spec.local, spec.remote, spec.outbound.spi, X.IPPROTO_ESP, None)
        ref = X.encode(
            X.XFRM_MSG_DELSA,
            {
                "daddr": K._addr_bytes(spec.remote),
                "spi": spec.outbound.spi,
                "family": K._family(spec.remote),
                "proto": X.IPPROTO_ESP,
            },
            [("XFRMA_SRCADDR", K._addr_bytes(spec.local))],
        )
        assert _no_seq(batch.buf) == ref


@pytest.mark.parametrize(
    "policy",
    [
        PolicySpec(_ts("10.0.0.0/24"), _ts("0.0.0.0/0"), Direction.OUT, PolicyAction.PASS, 3),
        PolicySpec(
            _ts("10.0.0.1/32"),
            _ts("198.51.100.0/24", 6, 443),
            Direction.OUT,
            PolicyAction.DROP,
            3,
            persistent=True,
            lifetime=Lifetime(hard_seconds=900),
        ),
        PolicySpec(
            _ts("2001:db8:1::/64"),
            TrafficSelector(ipaddress.ip_network("2001:db8:2::/48"), 58, icmp_type=128),
            Direction.OUT,
            PolicyAction.TRAP,
            9,
            (Template(LOCAL6, ipaddress.ip_address("2001:db8:2::1"), 0x4F450001),),
            mark=Mark(5),
        ),
    ],
)
def test_shunt_and_trap_policies_equal_the_declared_encoder(policy: PolicySpec) -> None:
    own = K.Ownership()
    for pol in (policy, replace(policy, priority=policy.priority + 1)):
        batch = Batch(1)
        K.add_policy(batch, pol, own, None)
        assert _no_seq(batch.buf) == X.encode(X.XFRM_MSG_UPDPOLICY, *K.policy_request(pol, own))


def _checked_child_policies(spec: ChildSaSpec) -> list[PolicySpec]:
    """child_policies as it was written before its objects skipped PolicySpec's checks:
    every object through the dataclass constructor (the reference)."""
    host = lambda a: TrafficSelector(ipaddress.ip_network(a))  # noqa: E731
    lts = spec.local_ts or (host(spec.local),)
    rts = spec.remote_ts or (host(spec.remote),)
    out_t = Template(spec.local, spec.remote, spec.reqid, spec.mode)
    in_t = Template(spec.remote, spec.local, spec.reqid, spec.mode)
    a, prio, mark = PolicyAction.IPSEC, spec.policy_priority, spec.mark
    pols = []
    for lt in lts:
        for rt in rts:
            pols.append(PolicySpec(lt, rt, Direction.OUT, a, prio, (out_t,), mark=mark))
            pols.append(PolicySpec(rt, lt, Direction.IN, a, prio, (in_t,), mark=mark))
            if spec.mode is Mode.TUNNEL:
                pols.append(PolicySpec(rt, lt, Direction.FWD, a, prio, (in_t,), mark=mark))
    return pols


_SELECTOR_SETS: list[tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]]] = [
    ((), ()),
    ((_ts("10.1.0.0/16"), _ts("10.2.0.5/32")), (_ts("198.51.100.0/24"), _ts("0.0.0.0/0"))),
    ((_ts("10.1.0.0/16"),), (_ts("198.51.100.7/32", 6, 443),)),  # protocols differ: normalised
    ((_ts("10.1.0.0/16", 17, 53),), (_ts("198.51.100.7/32", 17),)),
    (
        (_ts("10.1.0.0/16", 1),),
        (TrafficSelector(ipaddress.ip_network("198.51.100.0/24"), 1, icmp_type=8),),
    ),
    ((_ts("2001:db8:5::/48"),), (_ts("2001:db8:6::1/128", 58), _ts("2001:db8:7::/64"))),
]


@pytest.mark.parametrize("selectors", range(len(_SELECTOR_SETS)))
@pytest.mark.parametrize("v6", [False, True])
def test_child_sa_groups_patched_for_another_child_sa_equal_the_declared_encoder(
    selectors: int, v6: bool
) -> None:
    """The grouped SA and policy messages of a Child SA, built from the cached group of an
    earlier Child SA of the same shape (addresses, SPIs, keys, reqid and ports patched),
    equal the declared encoder's bytes for every message; child_policies' unchecked
    objects equal checked PolicySpecs (also in hash). v4/v6, several selector pairs,
    ICMP, protocols to normalise, marks, NAT-T, transport and tunnel."""
    own = K.Ownership()
    lts, rts = _SELECTOR_SETS[selectors]
    local = LOCAL6 if v6 else LOCAL4
    for mode, encap, mark, aead, lifetime in (
        (Mode.TUNNEL, None, None, True, Lifetime()),
        (Mode.TRANSPORT, NatTEncap(4500, 31000), Mark(0x42), False, Lifetime(hard_seconds=60)),
        (Mode.TUNNEL, NatTEncap(31001, 4500), Mark(7, 0xFF), False, Lifetime(soft_bytes=1 << 40)),
    ):
        for n in range(3):  # the first builds the groups, the others patch them
            remote = ipaddress.ip_address(int(local) + 0x10000 + n)
            encr = encr_algorithm(20 if aead else 12)
            integ = None if aead else integ_algorithm(12)
            klen, ilen = (36, 0) if aead else (32, 32)
            spec = ChildSaSpec(
                local,
                remote,
                SaKeys(0xC1000000 + 2 * n, bytes([n + 1]) * klen, bytes([n + 9]) * ilen),
                SaKeys(0xC1000001 + 2 * n, bytes([n + 3]) * klen, bytes([n + 5]) * ilen),
                encr,
                integ,
                mode=mode,
                local_ts=lts,
                remote_ts=rts,
                encap=encap,
                reqid=0x4F450010 + n,
                mark=mark,
                lifetime=lifetime,
                policy_priority=5,
            )
            pols = child_policies(spec)
            reference = _checked_child_policies(spec)
            assert pols == reference
            assert [hash(p) for p in pols] == [hash(p) for p in reference]
            assert [p.__dict__ for p in pols] == [p.__dict__ for p in reference]
            batch = Batch(40 + n)
            K.add_child_sas(batch, spec, n == 1, n == 2, ("in", "out"))
            K.add_child_policies(batch, spec, own, pols, list(range(len(pols))))
            refs = _sa_references(spec, n == 1, n == 2)
            refs += [X.encode(X.XFRM_MSG_UPDPOLICY, *K.policy_request(p, own)) for p in reference]
            msgs = _messages(batch.buf)
            assert [_no_seq(m) for m in msgs] == refs
            assert [HDR.unpack_from(m)[3] for m in msgs] == list(range(40 + n, 40 + n + len(refs)))
            assert batch.tags == ["in", "out", *range(len(pols))]


def test_equal_selectors_hash_equal_and_the_kept_hash_stays_out_of_sight() -> None:
    a, b = _ts("10.0.0.0/8", 6, 80), _ts("10.0.0.0/8", 6, 80)
    assert hash(a) == hash(b) == hash(a) and a == b
    assert hash(a) == hash((a.net, a.proto, a.port, a.icmp_type))
    assert repr(a) == repr(b) == repr(replace(a)) and replace(a, port=81) != a
    assert {a: 1}[b] == 1


def _gcm_spec(i: int = 1, **kw: Any) -> ChildSaSpec:
    return ChildSaSpec(
        LOCAL4,
        ipaddress.ip_address(f"192.0.2.{i}"),
        SaKeys(0xC0000000 + 2 * i, b"\x11" * 36),
        SaKeys(0xC0000001 + 2 * i, b"\x22" * 36),
        encr_algorithm(20),
        reqid=0x4F450000 + i,
        **kw,
    )


def test_batch_numbers_messages_asks_for_acks_and_hides_keys() -> None:
    spec = _gcm_spec()
    batch = Batch(0xFFFFFFFE)  # wraps around
    K.add_child_sas(batch, spec, False, False, ("in", "out"))
    pols = child_policies(spec)
    K.add_child_policies(batch, spec, K.Ownership(), pols, [p.direction.value for p in pols])
    msgs = _messages(batch.buf)
    assert len(msgs) == len(batch) == 5
    heads = [HDR.unpack_from(m) for m in msgs]
    assert [h[3] for h in heads] == [0xFFFFFFFE, 0xFFFFFFFF, 0, 1, 2]
    assert {h[2] for h in heads} == {NLM_F_REQUEST}  # answered only if they fail ...
    batch.ask_ack(4)  # ... but for the last of a send (_commit asks)
    assert [HDR.unpack_from(m)[2] for m in _messages(batch.buf)] == [NLM_F_REQUEST] * 4 + [
        NLM_F_REQUEST | NLM_F_ACK
    ]
    types = [h[1] for h in heads]
    assert types == [X.XFRM_MSG_NEWSA] * 2 + [X.XFRM_MSG_UPDPOLICY] * 3
    sa_out = X.decode(msgs[1])
    assert (sa_out["id_spi"], sa_out["reqid"]) == (spec.outbound.spi, spec.reqid)
    assert sa_out.get_attr("XFRMA_ALG_AEAD")["alg_key"] == b"\x22" * 36
    assert [X.decode(m)["dir"] for m in msgs[2:]] == [
        X.XFRM_POLICY_OUT,
        X.XFRM_POLICY_IN,
        X.XFRM_POLICY_FWD,
    ]
    assert b"\x22" * 36 not in repr(batch).encode() and "22" * 8 not in repr(batch)
    batch.wipe()
    assert batch.buf == bytearray(len(batch.buf))
    # no prototype in the cache holds key material
    for cached in (*K._PROTOTYPES.values(), *K._GROUPS.values()):
        assert b"\x22" * 16 not in cached.data and b"\x11" * 16 not in cached.data


def _ack(seq: int, err: int, text: str = "", capped: bool = True, echo: bytes = b"") -> bytes:
    """A kernel ACK / error message for request ``seq`` (as netlink_ack builds it)."""
    flags = NLM_F_CAPPED if capped else 0
    req = HDR.pack(16 + len(echo), X.XFRM_MSG_NEWSA, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + echo
    body = struct.pack("=i", -err) + req
    body += bytes(-len(body) % 4)
    if text:
        raw = text.encode() + b"\0"
        body += struct.pack("=HH", 4 + len(raw), 1) + raw + bytes(-len(raw) % 4)
        flags |= NLM_F_ACK_TLVS
    return HDR.pack(16 + len(body), NLMSG_ERROR, flags, seq, 1234) + body


def test_read_acks_attributes_each_answer_by_sequence() -> None:
    data = (
        _ack(99, 0)  # a stale ACK of an earlier batch
        + _ack(100, 0)
        + _ack(101, errno.EEXIST, "SA already exists")
        + _ack(102, errno.EINVAL, "Invalid length", capped=False, echo=b"k" * 20)
        + _ack(105, 0)  # beyond the batch
    )
    assert list(read_acks(data, 100, 3)) == [
        Ack(0, 0),
        Ack(1, errno.EEXIST, "SA already exists"),
        Ack(2, errno.EINVAL, "Invalid length"),
    ]
    assert list(read_acks(data[:-5], 100, 3))[:1] == [Ack(0, 0)]  # truncated tail skipped


def test_batch_error_names_the_failed_object_and_the_others() -> None:
    spec = _gcm_spec(7)
    batch = Batch(1)
    tags = [
        K._SaTag("in", spec.remote, spec.local, spec.inbound.spi, spec=spec),
        K._SaTag("out", spec.local, spec.remote, spec.outbound.spi, spec=spec),
        *(K._PolicyTag(p) for p in child_policies(spec)),
    ]
    batch.tags.extend(tags)
    acks = [Ack(0, 0), Ack(1, errno.EEXIST, "")] + [Ack(i, 0) for i in range(2, 5)]
    exc = K.batch_error(batch, acks)
    assert exc is not None and exc.errno == errno.EEXIST
    assert str(exc).startswith(
        "SA out 203.0.113.2->192.0.2.7 spi 0xc000000f (AES_GCM_16): already exists in the "
        "kernel (EEXIST)"
    ), str(exc)
    assert "also refused" not in str(exc)
    acks[4] = Ack(4, errno.ENOMEM, "")
    assert "[also refused: policy 192.0.2.7/32->203.0.113.2/32 fwd ipsec (ENOMEM)]" in str(
        K.batch_error(batch, acks)
    )
    assert K.batch_error(batch, [Ack(i, 0) for i in range(5)]) is None


# --- install_child_sa against an in-process fake kernel -----------------------------------
class FakeXfrmKernel:
    """Just enough of NETLINK_XFRM: SAs by (daddr, spi), policies by (selector, dir);
    NEWSA of a taken SPI is EEXIST. Each send is processed message by message, like
    netlink_rcv_skb: a failed message is answered with its errno, a message asking for
    an ACK (NLM_F_ACK) with its outcome, others not at all."""

    def __init__(self) -> None:
        self.sas: dict[tuple[bytes, int], int] = {}  # -> reqid
        self.policies: dict[tuple[Any, ...], int] = {}  # (daddr, saddr, dir) -> reqid
        self.sends: list[list[int]] = []  # message types of each send
        self.sent_buffers: list[bytearray] = []
        self.asked: list[list[int]] = []  # the sequence numbers asking for an ACK, per send
        self.drop_answers = False  # lose a send's answers but its last (ENOBUFS)
        self._queue: list[bytes | OSError] = []

    def _apply(self, msg: Any) -> int:
        mtype = msg["header"]["type"]
        if mtype in (X.XFRM_MSG_NEWSA, X.XFRM_MSG_UPDSA):
            key = (msg["id_daddr"], msg["id_spi"])
            if mtype == X.XFRM_MSG_NEWSA and key in self.sas:
                return errno.EEXIST
            self.sas[key] = msg["reqid"]
        elif mtype == X.XFRM_MSG_DELSA:
            if self.sas.pop((msg["daddr"], msg["spi"]), None) is None:
                return errno.ESRCH
        elif mtype == X.XFRM_MSG_UPDPOLICY:
            tmpl = msg.get_attr("XFRMA_TMPL") or [{"reqid": 0}]
            self.policies[(msg["sel_daddr"], msg["sel_saddr"], msg["dir"])] = tmpl[0]["reqid"]
        elif mtype == X.XFRM_MSG_DELPOLICY:
            pkey = (msg["sel_daddr"], msg["sel_saddr"], msg["dir"])
            if self.policies.pop(pkey, None) is None:
                return errno.ENOENT
        return 0

    # the socket interface XfrmDatapath uses
    def send(self, data: bytearray) -> int:
        self.sent_buffers.append(data)
        types = []
        asked = []
        for raw in _messages(data):
            (flags, seq) = struct.unpack_from("=HI", raw, 6)
            msg = X.decode(raw)
            types.append(msg["header"]["type"])
            err = self._apply(msg)
            if flags & NLM_F_ACK:
                asked.append(seq)
            if err or flags & NLM_F_ACK:  # as netlink_rcv_skb: failures, and who asks
                self._queue.append(_ack(seq, err))
        if self.drop_answers:
            self._queue[:-1] = [OSError(errno.ENOBUFS, "No buffer space available")]
        self.sends.append(types)
        self.asked.append(asked)
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        if not self._queue:
            raise BlockingIOError
        data = self._queue.pop(0)
        if isinstance(data, OSError):
            raise data
        buf[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class _Quiet:
    """Stands in for the pyroute2 sockets (requests with replies, events): unused here."""

    def setblocking(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeXfrmKernel:
    kernel = FakeXfrmKernel()
    monkeypatch.setattr(K, "_open_xfrm_socket", lambda netns, groups=(): _Quiet())
    monkeypatch.setattr(K, "_open_batch_socket", lambda netns: kernel)
    return kernel


def _run(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the datapath awaited something")


def test_install_is_one_send_and_wipes_the_keys(fake: FakeXfrmKernel) -> None:
    dp = K.XfrmDatapath()
    spec = _run(dp.install_child_sa(_gcm_spec(3)))
    assert fake.sends == [[X.XFRM_MSG_NEWSA] * 2 + [X.XFRM_MSG_UPDPOLICY] * 3]
    assert len(fake.sas) == 2 and set(fake.policies.values()) == {spec.reqid}
    assert fake.sent_buffers[0] == bytearray(len(fake.sent_buffers[0]))  # wiped after send
    assert dp.stats() == {"policies": 3}
    _run(dp.remove_child_sa(spec))
    assert fake.sends[1] == [X.XFRM_MSG_DELPOLICY] * 3 + [X.XFRM_MSG_DELSA] * 2
    assert fake.sas == {} and fake.policies == {} and dp.stats() == {"policies": 0}


def test_duplicate_spi_rolls_back_and_names_the_sa(fake: FakeXfrmKernel) -> None:
    """SA out's SPI is taken (by someone else): SA in and the three policies went in with
    the same send and are taken out again; the foreign SA stays."""
    spec = _gcm_spec(4)
    foreign = (K._addr_bytes(spec.remote), spec.outbound.spi)
    fake.sas[foreign] = 0x1234
    dp = K.XfrmDatapath()
    with pytest.raises(DatapathError) as info:
        _run(dp.install_child_sa(spec))
    assert str(info.value).startswith(
        f"SA out 203.0.113.2->192.0.2.4 spi {spec.outbound.spi:#010x} (AES_GCM_16): already "
        "exists in the kernel (EEXIST)"
    )
    assert info.value.errno == errno.EEXIST
    assert fake.sends == [
        [X.XFRM_MSG_NEWSA] * 2 + [X.XFRM_MSG_UPDPOLICY] * 3,
        [X.XFRM_MSG_DELSA] + [X.XFRM_MSG_DELPOLICY] * 3,  # the rollback, one send
    ]
    assert fake.sas == {foreign: 0x1234} and fake.policies == {}
    assert dp.stats() == {"policies": 0} and dp._sas == {}


def test_failed_rekey_gives_the_old_child_sa_its_policies_back(fake: FakeXfrmKernel) -> None:
    dp = K.XfrmDatapath()
    old = _run(dp.install_child_sa(_gcm_spec(5)))
    new = replace(
        old,
        reqid=old.reqid + 0x100,
        inbound=SaKeys(0xD0000001, b"\x33" * 36),
        outbound=SaKeys(0xD0000002, b"\x44" * 36),
    )
    fake.sas[(K._addr_bytes(new.remote), new.outbound.spi)] = 0x99  # SA out will clash
    with pytest.raises(DatapathError, match=r"SA out .* already exists"):
        _run(dp.install_child_sa(new))
    assert set(fake.policies.values()) == {old.reqid}  # restored, not deleted
    assert len(fake.policies) == 3
    assert (K._addr_bytes(new.local), new.inbound.spi) not in fake.sas
    assert dp._policies == {dp._key(p): p for p in child_policies(old)}


def _policy_batch(dp: K.XfrmDatapath, count: int) -> Batch:
    batch = dp._batch()
    for i in range(count):
        pol = PolicySpec(
            _ts(f"10.9.{i // 250}.{i % 250 + 1}/32"),
            _ts("0.0.0.0/0"),
            Direction.OUT,
            PolicyAction.PASS,
            3,
        )
        K.add_policy(batch, pol, dp.ownership, K._PolicyTag(pol))
    return batch


def test_only_the_last_message_of_each_send_is_acked_and_success_is_inferred_from_it(
    fake: FakeXfrmKernel,
) -> None:
    """70 policies: two sends (64 + 6), each asking an ACK of its last message only; all
    70 count as installed once those two ACKs came, and a refused one in between is
    still named by its own answer."""
    dp = K.XfrmDatapath()
    first_seq = dp._seq
    acks = dp._commit(_policy_batch(dp, 70))
    assert [len(s) for s in fake.sends] == [K.MAX_PER_SEND, 70 - K.MAX_PER_SEND]
    assert fake.asked == [[first_seq + K.MAX_PER_SEND - 1], [first_seq + 69]]
    assert acks == [Ack(i, 0) for i in range(70)] and len(fake.policies) == 70
    batch = dp._batch()
    spec = _gcm_spec(8)
    fake.sas[(K._addr_bytes(spec.local), spec.inbound.spi)] = 1  # SA in will clash
    K.add_child_sas(batch, spec, False, False, ("in", "out"))
    assert [a.errno for a in dp._commit(batch)] == [errno.EEXIST, 0]


def test_dropped_answers_leave_the_outcome_unknown(fake: FakeXfrmKernel) -> None:
    """ENOBUFS: some answers were lost, so the last message's ACK proves nothing about
    the others: they are ETIMEDOUT (undone like successes), not successes."""
    dp = K.XfrmDatapath()
    fake.drop_answers = True
    acks = dp._commit(_policy_batch(dp, 5))
    assert [a.errno for a in acks] == [errno.ETIMEDOUT] * 4 + [0]
