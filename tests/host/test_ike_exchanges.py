"""The second half of IKEv2 over real UDP between network namespaces.

CREATE_CHILD_SA (Child SA rekey with PFS, IKE SA rekey, simultaneous-rekey
collisions), INFORMATIONAL (Child SA delete, liveness checks), INVALID_KE_PAYLOAD
retries, COOKIEs and RFC 7383 fragmentation: ours with ours, and ours with real
strongSwan charon 5.9.8 (kernel-libipsec) in both roles. Every test is bounded
by short lifetimes (seconds) and asserts what the peers report: SPIs in
``swanctl --list-sas``, Child SA keys equal to charon's level-4 key log, charon's
own log lines for the exchanges it saw, and our service's events and rows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from oe_router.config.schema import IkeConfig, OeConfig
from oe_router.datapath.kernel import XfrmSocketHooks
from oe_router.datapath.netns import in_netns
from oe_router.ike.auth import PrivateKey
from oe_router.ike.constants import DhId, EncrId, PrfId
from oe_router.ike.cookies import ResponderLimits
from oe_router.ike.events import ChildSaEstablished, ChildSaRekeyed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.proposals import IkeProposalSpec
from oe_router.ike.sa import IkeSa
from oe_router.ike.service import IkeService, PeerSa, RecordingSink
from tests import ike_pair
from tests.aio import running

from .charon import Charon, namespaces

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("need_charon")]

TCP, UDP, ICMP = 6, 17, 1


# --------------------------------------------------------------------------- helpers


async def until(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` (every 20 ms) until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.02)


def ike_config(**kw: Any) -> OeConfig:
    """Fast retransmits, no liveness checks unless asked, and the given lifetimes."""
    base: dict[str, Any] = {"retransmit_timeout": 0.3, "retransmit_tries": 3, "dpd_delay": 0.0}
    return OeConfig(ike=IkeConfig(**(base | kw)))


def service(ns: str, address: str, **kw: Any) -> IkeService:
    """Our IKE service in ``ns`` with the XFRM socket hooks, as the daemon wires it."""
    kw.setdefault("socket_hooks", (XfrmSocketHooks(),))
    return IkeService([address], netns=ns, **kw)


def sink(svc: IkeService) -> RecordingSink:
    assert isinstance(svc.sink, RecordingSink)
    return svc.sink


def only(svc: IkeService) -> PeerSa:
    """The one IKE SA ``svc`` holds."""
    assert len(svc.sas) == 1, [p.state for p in svc.sas]
    return svc.sas[0]


def children(svc: IkeService) -> dict[bytes, ChildSaEstablished]:
    return {spi: c.event for p in svc.sas for spi, c in p.children.items()}


def pairs_agree(a: IkeService, b: IkeService) -> bool:
    """Each side holds the mirror image of the other's Child SAs (SPIs and keys)."""
    ca, cb = children(a), children(b)
    if not ca or len(ca) != len(cb):
        return False
    for spi_in, ev in ca.items():
        peer = cb.get(ev.spi_out)
        if peer is None or peer.spi_out != spi_in:
            return False
        if (ev.encr_key_in, ev.encr_key_out) != (peer.encr_key_out, peer.encr_key_in):
            return False
    return True


def ike_spis(svc: IkeService) -> str:
    return only(svc).handle.sa.spis()[0][0].hex() + only(svc).handle.sa.spis()[0][1].hex()


def host_ts(address: str, proto: int = 0, port: int | None = None) -> TrafficSelector:
    ip = ipaddress.ip_address(address)
    lo, hi = (0, 65535) if port is None else (port, port)
    return TrafficSelector.from_range(ip, ip, proto, lo, hi)


def flush(svc: IkeService, p: PeerSa) -> None:
    assert svc.endpoint is not None
    svc.endpoint.flush(p.handle)


# --------------------------------------------------------------------------- ours <-> ours


@pytest.fixture(scope="module")
def pair_ns() -> Iterator[tuple[str, str]]:
    with namespaces("x") as net:
        a, b = net.add("a"), net.add("b")
        net.link(a, "10.0.3.1/24", b, "10.0.3.2/24")
        yield a, b


A, B = "10.0.3.1", "10.0.3.2"


def test_ours_with_ours_command_stream(pair_ns: tuple[str, str]) -> None:
    """One IKE SA carries four Child SAs (different protocol/port selectors); both sides
    rekey two of them at once (PFS), both sides rekey the IKE SA (the Child SAs move
    with it), one side deletes a Child SA, and a liveness check is answered."""

    async def go() -> None:
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        async with running(a, ike_config()), running(b, ike_config()):
            p = await a.up(B)
            sa = p.handle.sa
            for proto, port in ((TCP, 80), (UDP, 53), (ICMP, None)):
                sa.create_child((host_ts(A, proto),), (host_ts(B, proto, port),), False, a.now())
            flush(a, p)
            await until("4 Child SAs on both sides", lambda: len(children(b)) == 4)
            assert pairs_agree(a, b)
            assert {ev.ts_remote[0].ip_protocol for ev in children(a).values()} == {
                0,
                TCP,
                UDP,
                ICMP,
            }
            q = only(b)
            assert q.handle.sa is not sa and q.handle.sa.spis()[0] == sa.spis()[0]

            # rekeys from both ends at once: a two, b the other two
            before = set(children(a))
            a_spis = sorted(before)
            for spi in a_spis[:2]:
                sa.rekey_child(spi, a.now())
            for spi in a_spis[2:]:
                q.handle.sa.rekey_child(children(a)[spi].spi_out, b.now())
            flush(a, p)
            flush(b, q)
            await until(
                "all four Child SAs replaced on both sides",
                lambda: not (set(children(a)) & before) and len(children(a)) == 4
                and pairs_agree(a, b),
            )  # fmt: skip
            rekeyed = [ev for _, ev in sink(a).established if isinstance(ev, ChildSaRekeyed)]
            assert {ev.old_spi_in for ev in rekeyed} == before
            assert len(sink(a).deleted) == 4 and len(sink(b).deleted) == 4

            # IKE SA rekeyed by a, then by b: Child SAs move, SPIs stay
            kids = set(children(a))
            for svc, peer in ((a, p), (b, q)):
                old = ike_spis(a)
                peer.handle.sa.rekey(svc.now())
                flush(svc, peer)
                await until(
                    "IKE SA rekeyed on both sides",
                    lambda old=old: ike_spis(a) != old and ike_spis(a) == ike_spis(b),  # type: ignore[misc]
                )
                assert set(children(a)) == kids and pairs_agree(a, b)
            assert only(a).handle.sa.is_initiator is False  # b sent the last rekey

            # b deletes one Child SA
            gone = sorted(children(b))[0]
            q.handle.sa.delete_child(gone, b.now())
            flush(b, q)
            await until("3 Child SAs on both sides", lambda: len(children(a)) == 3)
            assert pairs_agree(a, b) and gone not in children(b)

            # liveness check from a, answered by b
            ea, eb = a.endpoint, b.endpoint
            assert ea is not None and eb is not None
            for _ in range(2):  # the second check is only allowed once the first is answered
                rx = (ea.counters.received + 1, eb.counters.received + 1)
                sa.send_liveness_check(a.now())
                flush(a, p)
                await until(
                    "the check answered",
                    lambda rx=rx: (ea.counters.received, eb.counters.received) == rx,  # type: ignore[misc]
                )
            assert sa.state == "established" and p.error is None

            assert await a.down(B) == 1
            await until("b saw the Delete", lambda: b.sas == [])

    asyncio.run(go())


def test_ours_with_ours_simultaneous_rekeys(pair_ns: tuple[str, str]) -> None:
    """Both ends rekey the same Child SA in the same instant (RFC 7296 §2.8.1: the
    SA with the lowest nonce is redundant and deleted), then the IKE SA (§2.8.2)."""

    async def go() -> None:
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        async with running(a, ike_config()), running(b, ike_config()):
            p = await a.up(B)
            await until("b has the Child SA", lambda: len(children(b)) == 1)
            q = only(b)
            (old,) = children(a)
            p.handle.sa.rekey_child(old, a.now())
            q.handle.sa.rekey_child(children(a)[old].spi_out, b.now())
            flush(a, p)
            flush(b, q)  # both requests are on the wire before either is answered
            await until(
                "one surviving Child SA on both sides",
                lambda: len(children(a)) == 1 and old not in children(a) and pairs_agree(a, b)
                and len(sink(a).deleted) == 2 and len(sink(b).deleted) == 2,
            )  # fmt: skip
            # the collision made two new pairs on each side: one survived, one was redundant
            assert len(sink(a).established) == 3 and len(sink(b).established) == 3
            await asyncio.sleep(0.2)
            assert len(children(a)) == 1 and pairs_agree(a, b)

            spis = ike_spis(a)
            p.handle.sa.rekey(a.now())
            q.handle.sa.rekey(b.now())
            flush(a, p)
            flush(b, q)
            await until(
                "IKE SA rekeyed once on both sides",
                lambda: ike_spis(a) != spis and ike_spis(a) == ike_spis(b),
            )
            await asyncio.sleep(0.2)
            assert ike_spis(a) == ike_spis(b) and pairs_agree(a, b)
            assert p.error is None and q.error is None
            # the IKE SA that lost the collision is deleted: only the winner answers
            assert len(p.handle.sa.spis()) == 1 and len(q.handle.sa.spis()) == 1
            await a.down(B)

    asyncio.run(go())


def test_ours_with_ours_equal_lifetimes(pair_ns: tuple[str, str]) -> None:
    """Both sides with the same short lifetimes and no jitter (child 3 s, IKE 4.5 s,
    rekey 1 s before): both rekey at about the same moment, from their own timers;
    whatever collides, one consistent Child SA and IKE SA remain, nothing expires."""

    async def go() -> None:
        cfg = ike_config(child_lifetime=3.0, ike_lifetime=4.5, rekey_margin=1.0, rekey_jitter=0)
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        async with running(a, cfg), running(b, cfg):
            p = await a.up(B)
            t0 = time.monotonic()
            await until("b has the Child SA", lambda: len(children(b)) == 1)
            (first,) = children(a)
            spis = ike_spis(a)
            await until(
                "Child SA rekeyed by the timers",
                lambda: first not in children(a) and pairs_agree(a, b),
                timeout=3.0,
            )
            assert time.monotonic() - t0 < 3.0, "the Child SA expired instead of rekeying"
            await until(
                "IKE SA rekeyed by the timers",
                lambda: ike_spis(a) != spis and ike_spis(a) == ike_spis(b),
                timeout=3.5,
            )
            await asyncio.sleep(0.3)
            assert pairs_agree(a, b) and len(children(a)) == 1
            assert p.error is None and only(b).error is None
            assert all(s == "established" for s in (p.state, only(b).state))
            await a.down(B)

    asyncio.run(go())


# --------------------------------------------------------------------------- ours <-> charon

OURS, THEIRS = "10.0.4.1", "10.0.4.2"
IKE = "aes256gcm16-prfsha256-x25519-ecp256-modp2048"
#: with DH groups, so charon does PFS on Child SA rekeys (dropped in IKE_AUTH)
ESP = "aes256gcm16-x25519-ecp256-modp2048"


@dataclass
class Key:
    private: PrivateKey

    def pkcs8(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def spki(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def ec_keys() -> tuple[Key, Key]:
    """(ours, charon's) ECDSA P-256."""
    return Key(ec.generate_private_key(ec.SECP256R1())), Key(
        ec.generate_private_key(ec.SECP256R1())
    )


@pytest.fixture(scope="module")
def charon_ns() -> Iterator[tuple[str, str]]:
    """(our namespace, charon's), joined by one veth."""
    with namespaces("e") as net:
        o, c = net.add("o"), net.add("c")
        net.link(o, f"{OURS}/24", c, f"{THEIRS}/24")
        yield o, c


def charon_conn(
    name: str,
    *,
    initiator: bool,
    ike: str = IKE,
    ike_opts: str = "",
    child_opts: str = "",
) -> str:
    """A swanctl connection to or from us (ECDSA keys unless ``ike_opts`` says otherwise)."""
    remote = OURS if initiator else "%any"
    return f"""
  {name} {{
    version = 2
    local_addrs = {THEIRS}
    remote_addrs = {remote}
    proposals = {ike}
    unique = never
    {ike_opts}
    local {{ auth = pubkey
      pubkeys = charon.pem
      id = charon.example }}
    remote {{ auth = pubkey
      pubkeys = ours.pem
      id = router.example }}
    children {{ {name}-c {{ local_ts = dynamic
      remote_ts = dynamic
      esp_proposals = {ESP}
      mode = tunnel
      {child_opts} }} }}
  }}"""


StartCharon = Callable[..., Charon]


@pytest.fixture
def start_charon(charon: StartCharon) -> StartCharon:
    """``start_charon(ns, conns, keys, extra="")``: charon in ``ns`` with ``conns``, its
    key and ours from ``keys`` (ours, charon's), ``extra`` in its strongswan.conf; stopped
    at teardown (conftest's ``charon``)."""

    def start(ns: str, conns: str, keys: tuple[Key, Key], extra: str = "") -> Charon:
        ours, theirs = keys
        return charon(
            ns,
            conns,
            pubkeys={"ours.pem": ours.spki(), "charon.pem": theirs.spki()},
            privkeys={"charon.pem": theirs.pkcs8()},
            extra_charon=extra,
        )

    return start


def our_service(ns: str, key: Key, **kw: Any) -> IkeService:
    return service(ns, OURS, private_key=key.private, local_id="@router.example", **kw)


def charon_child_spis(sas: str) -> list[tuple[str, str]]:
    """(charon's inbound SPI, its outbound SPI) of every INSTALLED Child SA it lists."""
    out, state, spi_in = [], "", ""
    for line in sas.splitlines():
        if m := re.match(r"\s+\S+: #\d+, reqid \d+, (\w+),", line):
            state = m.group(1)
        elif m := re.match(r"\s+in  ([0-9a-f]{8}),", line):
            spi_in = m.group(1)
        elif (m := re.match(r"\s+out ([0-9a-f]{8}),", line)) and state == "INSTALLED":
            out.append((spi_in, m.group(1)))
    return out


def charon_ike_spis(sas: str) -> list[str]:
    """SPIi+SPIr (hex) of every IKE SA charon lists."""
    return [i + r for i, r in re.findall(r"\b([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", sas)]


def child_keys(ev: ChildSaEstablished, initiator: bool) -> dict[str, bytes]:
    """Our Child SA keys under charon's names; ``initiator``: we began the exchange."""
    i, r = (ev.encr_key_out, ev.encr_key_in) if initiator else (ev.encr_key_in, ev.encr_key_out)
    return {"encryption initiator key": i, "encryption responder key": r}


def assert_child_keys_logged(ch: Charon, ev: ChildSaEstablished, initiator: bool) -> None:
    ours = child_keys(ev, initiator)
    groups = [g for g in ch.key_log() if "encryption initiator key" in g]
    assert any(all(g.get(k) == v for k, v in ours.items()) for g in groups), (
        f"no charon key group equals our Child SA {ev.spi_in.hex()} ({len(groups)} logged)"
    )


def assert_ike_keys_logged(ch: Charon, p: PeerSa) -> None:
    nk = p.handle.sa.negotiated_keys()
    assert nk is not None
    k = nk.keys
    ours = {"Sk_d": k.sk_d, "Sk_pi": k.sk_pi, "Sk_pr": k.sk_pr, "Sk_ei": k.sk_ei}
    groups = [g for g in ch.key_log() if "Sk_d" in g]
    assert any(all(g.get(n) == v for n, v in ours.items()) for g in groups), (
        f"no charon IKE key group equals ours ({len(groups)} logged)"
    )


async def sas(ch: Charon) -> str:
    return await asyncio.to_thread(ch.list_sas)


def rekeys(svc: IkeService) -> list[ChildSaRekeyed]:
    return [ev for _, ev in sink(svc).established if isinstance(ev, ChildSaRekeyed)]


def test_charon_initiator_rekeys_child_we_rekey_ike(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """charon initiates and rekeys its Child SA after 2 s (PFS: a KE in the request);
    our responder answers; we rekey the IKE SA after 3.4 s (ike_lifetime 4 s); charon
    then terminates the Child SA and we delete the IKE SA. After each rekey the SPIs
    are charon's and the keys equal its key log."""
    ours_ns, ns = charon_ns
    conns = charon_conn(
        "out", initiator=True, child_opts="rekey_time = 2s\n life_time = 20s\n rand_time = 0"
    )
    ch = start_charon(ns, conns, ec_keys)

    async def go() -> None:
        svc = our_service(
            ours_ns,
            ec_keys[0],
            peer_keys={THEIRS: ec_keys[1].private.public_key()},
        )
        async with running(svc, ike_config(ike_lifetime=4.0, rekey_jitter=0)):
            out = await asyncio.to_thread(ch.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            await until("our responder has the Child SA", lambda: len(children(svc)) == 1)
            p = only(svc)
            (first,) = children(svc).values()
            assert_child_keys_logged(ch, first, initiator=False)
            await until("charon rekeyed the Child SA", lambda: len(rekeys(svc)) == 1, 4.0)
            (ev,) = rekeys(svc)
            assert (ev.old_spi_in, ev.old_spi_out) == (first.spi_in, first.spi_out)
            await until("the old Child SA deleted", lambda: len(sink(svc).deleted) == 1)
            assert list(children(svc)) == [ev.spi_in]
            listing = await sas(ch)
            assert charon_child_spis(listing) == [(ev.spi_out.hex(), ev.spi_in.hex())], listing
            assert_child_keys_logged(ch, ev, initiator=False)
            assert re.search(
                r"generating CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No KE TSi TSr \]",
                ch.log(),
            ), "charon's rekey carried no KE (no PFS)"

            old_ike = ike_spis(svc)
            await until("we rekeyed the IKE SA", lambda: ike_spis(svc) != old_ike, 3.0)
            assert p.handle.sa.is_initiator
            listing = await sas(ch)
            assert charon_ike_spis(listing) == [ike_spis(svc)], listing
            assert charon_child_spis(listing) == [(ev.spi_out.hex(), ev.spi_in.hex())], listing
            assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ SA No KE \]", ch.log())
            assert_ike_keys_logged(ch, p)

            await asyncio.to_thread(ch.swanctl, "--terminate", "--child", "out-c")
            await until("charon's Child SA Delete reached us", lambda: not children(svc))
            assert [d.spi_in for _, d in sink(svc).deleted][-1] == ev.spi_in
            assert await svc.down(THEIRS) == 1
            assert charon_ike_spis(await sas(ch)) == []

    asyncio.run(go())


def test_our_initiator_rekeys_child_charon_rekeys_ike(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """We initiate with child_lifetime 2.5 s (rekey at 2 s, PFS); charon accepts; charon
    rekeys the IKE SA after 3 s (its rekey_time) and our responder follows; we delete
    the Child SA, then charon deletes the IKE SA."""
    ours_ns, ns = charon_ns
    conns = charon_conn(
        "in", initiator=False, ike_opts="rekey_time = 3s\n over_time = 20s\n rand_time = 0"
    )
    ch = start_charon(ns, conns, ec_keys)

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0])
        async with running(svc, ike_config(child_lifetime=2.5, rekey_margin=0.5, rekey_jitter=0)):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            (first,) = children(svc).values()
            assert_child_keys_logged(ch, first, initiator=True)
            await until("we rekeyed the Child SA", lambda: len(rekeys(svc)) == 1, 3.0)
            (ev,) = rekeys(svc)
            assert (ev.old_spi_in, ev.old_spi_out) == (first.spi_in, first.spi_out)
            await until("the old Child SA deleted", lambda: len(sink(svc).deleted) == 1)
            listing = await sas(ch)
            assert charon_child_spis(listing) == [(ev.spi_out.hex(), ev.spi_in.hex())], listing
            assert_child_keys_logged(ch, ev, initiator=True)
            assert re.search(
                r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No KE TSi TSr \]",
                ch.log(),
            ), "our rekey carried no KE (no PFS)"

            old_ike = ike_spis(svc)
            await until("charon rekeyed the IKE SA", lambda: ike_spis(svc) != old_ike, 3.0)
            assert not p.handle.sa.is_initiator
            listing = await sas(ch)
            assert charon_ike_spis(listing) == [ike_spis(svc)], listing
            assert charon_child_spis(listing) == [(ev.spi_out.hex(), ev.spi_in.hex())], listing
            assert re.search(r"generating CREATE_CHILD_SA request \d+ \[ SA No KE \]", ch.log())
            assert_ike_keys_logged(ch, p)

            p.handle.sa.delete_child(ev.spi_in, svc.now())
            flush(svc, p)
            await until("our Child SA Delete answered", lambda: not children(svc))
            assert charon_child_spis(await sas(ch)) == []
            assert charon_ike_spis(await sas(ch)) == [ike_spis(svc)]
            await asyncio.to_thread(ch.swanctl, "--terminate", "--ike", "in")
            await until("charon's IKE SA Delete reached us", lambda: svc.sas == [])
            assert p.error is None

    asyncio.run(go())


# --------------------------------------------------------------------------- INVALID_KE_PAYLOAD


@pytest.mark.parametrize(
    ("group", "want", "dh"),
    [("modp2048", "MODP_2048", DhId.MODP_2048), ("x25519", "CURVE_25519", DhId.CURVE25519)],
)
def test_invalid_ke_our_initiator_retries_with_charons_group(
    start_charon: StartCharon,
    charon_ns: tuple[str, str],
    ec_keys: tuple[Key, Key],
    group: str,
    want: str,
    dh: DhId,
) -> None:
    """We guess ECP-256 first; charon only takes ``group`` and answers INVALID_KE_PAYLOAD;
    we retry IKE_SA_INIT with its group and the IKE SA comes up with it."""
    ours_ns, ns = charon_ns
    ch = start_charon(
        ns,
        charon_conn("in", initiator=False, ike=f"aes256gcm16-prfsha256-{group}"),
        ec_keys,
    )
    ours = IkeProposalSpec(
        EncrId.AES_GCM_16,
        256,
        PrfId.HMAC_SHA2_256,
        None,
        (DhId.ECP_256, DhId.MODP_2048, DhId.CURVE25519),
    )

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0], ike_proposals=(ours,))
        async with running(svc, ike_config()):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            assert p.ike is not None and p.ike.dh_group == dh
            assert f"DH group ECP_256 unacceptable, requesting {want}" in ch.log()
            listing = await sas(ch)
            assert f"AES_GCM_16-256/PRF_HMAC_SHA2_256/{want}" in listing, listing
            assert charon_ike_spis(listing) == [ike_spis(svc)]
            assert_ike_keys_logged(ch, p)
            # our IKE SA rekey keeps the group charon asked for
            old = ike_spis(svc)
            p.handle.sa.rekey(svc.now())
            flush(svc, p)
            await until("we rekeyed the IKE SA", lambda: ike_spis(svc) != old)
            listing = await sas(ch)
            assert charon_ike_spis(listing) == [ike_spis(svc)], listing
            assert f"AES_GCM_16-256/PRF_HMAC_SHA2_256/{want}" in listing, listing
            assert_ike_keys_logged(ch, p)
            await svc.down(THEIRS)

    asyncio.run(go())


def test_invalid_ke_our_responder_asks_charon_for_our_group(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """charon initiates guessing MODP-2048 (its first group); our responder only takes
    ECP-256 / X25519 and answers INVALID_KE_PAYLOAD(19); charon retries with ECP-256."""
    ours_ns, ns = charon_ns
    ch = start_charon(
        ns,
        charon_conn("out", initiator=True, ike="aes256gcm16-prfsha256-modp2048-ecp256"),
        ec_keys,
    )
    ours = IkeProposalSpec(
        EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, None, (DhId.ECP_256, DhId.CURVE25519)
    )

    async def go() -> None:
        svc = our_service(
            ours_ns,
            ec_keys[0],
            ike_proposals=(ours,),
            peer_keys={THEIRS: ec_keys[1].private.public_key()},
        )
        async with running(svc, ike_config()):
            out = await asyncio.to_thread(ch.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            assert "peer didn't accept DH group MODP_2048, it requested ECP_256" in out, out
            await until("our responder has the IKE SA", lambda: only(svc).ike is not None)
            p = only(svc)
            assert p.ike is not None and p.ike.dh_group == DhId.ECP_256
            assert charon_ike_spis(await sas(ch)) == [ike_spis(svc)]
            assert_ike_keys_logged(ch, p)
            # charon's IKE SA rekey: it may guess MODP-2048 again; we insist on ours
            old = ike_spis(svc)
            await asyncio.to_thread(ch.swanctl, "--rekey", "--ike", "out")
            await until("charon rekeyed the IKE SA", lambda: ike_spis(svc) != old)
            listing = await sas(ch)
            assert charon_ike_spis(listing) == [ike_spis(svc)], listing
            assert "AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_256" in listing, listing
            nk = p.handle.sa.negotiated_keys()
            assert nk is not None and nk.dh_group == DhId.ECP_256
            assert_ike_keys_logged(ch, p)
            await svc.down(THEIRS)

    asyncio.run(go())


# --------------------------------------------------------------------------- COOKIE


def test_cookie_demanded_by_our_responder_charon_retries(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """Our responder with cookie threshold 0 answers charon's first IKE_SA_INIT with a
    COOKIE only; charon repeats the request with it and the IKE SA comes up."""
    ours_ns, ns = charon_ns
    ch = start_charon(ns, charon_conn("out", initiator=True), ec_keys)

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0], peer_keys={THEIRS: ec_keys[1].private.public_key()})
        await svc.start(ike_config())
        assert svc.endpoint is not None
        svc.endpoint.limits = ResponderLimits(cookie_threshold=0, half_open_limit=64)
        try:
            out = await asyncio.to_thread(ch.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            assert svc.endpoint.counters.cookies_sent == 1
            log = ch.log()
            assert re.search(r"parsed IKE_SA_INIT response 0 \[ N\(COOKIE\) \]", log), log
            assert re.search(r"generating IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No", log)
            await until("our responder has the Child SA", lambda: len(children(svc)) == 1)
            (ev,) = children(svc).values()
            assert charon_child_spis(await sas(ch)) == [(ev.spi_out.hex(), ev.spi_in.hex())]
            assert_child_keys_logged(ch, ev, initiator=False)
            await svc.down(THEIRS)
        finally:
            await svc.stop()

    asyncio.run(go())


def test_cookie_demanded_by_charon_honoured_by_our_initiator(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """charon with dos_protection and cookie_threshold 1, one half-open IKE SA already
    (a bare IKE_SA_INIT we never continue): it answers our IKE_SA_INIT with a COOKIE;
    our initiator repeats it with the cookie and gets the IKE SA."""
    ours_ns, ns = charon_ns
    extra = "dos_protection = yes\n  cookie_threshold = 1\n  block_threshold = 100"
    ch = start_charon(ns, charon_conn("in", initiator=False), ec_keys, extra)

    def half_open() -> bytes:
        cfg = ike_pair.config((OURS, 0), (THEIRS, 500))
        request = IkeSa.initiator(cfg, 0.0).datagrams_to_send()[0]
        with in_netns(ours_ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.settimeout(3)
            s.bind((OURS, 0))
            s.sendto(request, (THEIRS, 500))
            return s.recv(4096)

    async def go() -> None:
        answer = await asyncio.to_thread(half_open)
        assert len(answer) > 100, "charon did not answer the half-open IKE_SA_INIT"
        svc = our_service(ours_ns, ec_keys[0])
        async with running(svc, ike_config()):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            log = ch.log()
            assert re.search(r"generating IKE_SA_INIT response 0 \[ N\(COOKIE\) \]", log), log
            assert re.search(r"parsed IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No", log), log
            (ev,) = children(svc).values()
            listing = await sas(ch)
            assert ike_spis(svc) in charon_ike_spis(listing), listing
            assert (ev.spi_out.hex(), ev.spi_in.hex()) in charon_child_spis(listing)
            assert_child_keys_logged(ch, ev, initiator=True)
            assert p.error is None
            await svc.down(THEIRS)

    asyncio.run(go())


# --------------------------------------------------------------------------- fragmentation


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Key, Key]:
    """(ours, charon's) RSA-4096: signatures big enough to need IKE fragments."""
    return Key(rsa.generate_private_key(65537, 4096)), Key(rsa.generate_private_key(65537, 4096))


FRAGMENT_REASSEMBLED = (
    r"received fragment #(\d+) of (\d+), reassembled fragmented IKE message \((\d+) bytes\)"
)
FRAGMENT_SPLIT = r"splitting IKE message \((\d+) bytes\) into (\d+) fragments"


def test_fragmented_ike_auth_both_ways_with_rsa_4096(
    start_charon: StartCharon, charon_ns: tuple[str, str], rsa_keys: tuple[Key, Key]
) -> None:
    """RSA-4096 signatures make IKE_AUTH about 900 bytes: our request goes as RFC 7383
    fragments of at most 300 bytes, which charon reassembles; charon (fragment_size
    600) fragments its response, which we reassemble."""
    ours_ns, ns = charon_ns
    keys = rsa_keys
    conns = charon_conn("in", initiator=False, ike_opts="fragmentation = yes")
    ch = start_charon(ns, conns, keys, "fragment_size = 600")

    async def go() -> None:
        svc = our_service(ours_ns, keys[0])
        await svc.start(ike_config(fragment_size=300))
        assert svc.endpoint is not None
        try:
            p = await svc.up(THEIRS, "pubkey", keys[1].private.public_key())
            log = ch.log()
            got = re.search(FRAGMENT_REASSEMBLED, log)
            assert got is not None, log
            n_ours, size = int(got.group(2)), int(got.group(3))
            assert n_ours >= 3 and size > 800, (n_ours, size)
            split = re.search(FRAGMENT_SPLIT, log)
            assert split is not None, log
            n_theirs = int(split.group(2))
            assert n_theirs >= 2
            assert re.search(r"generating IKE_AUTH response 1 \[ EF\(1/\d+\) \]", log), log
            # IKE_SA_INIT response + every fragment of the IKE_AUTH response reached us
            assert svc.endpoint.counters.received == 1 + n_theirs
            assert p.ike is not None and p.ike.peer_auth_method == 14
            (row,) = svc.rows()
            assert row.remote_auth == "digital_signature(RSA-4096)"
            (ev,) = children(svc).values()
            assert charon_child_spis(await sas(ch)) == [(ev.spi_out.hex(), ev.spi_in.hex())]
            assert_child_keys_logged(ch, ev, initiator=True)
            await svc.down(THEIRS)
        finally:
            await svc.stop()

    asyncio.run(go())


def test_fragmented_ike_auth_charon_initiator_our_responder(
    start_charon: StartCharon, charon_ns: tuple[str, str], rsa_keys: tuple[Key, Key]
) -> None:
    """The other roles: charon's IKE_AUTH request in fragments (fragment_size 600),
    reassembled by our responder; our response in fragments of at most 300 bytes,
    reassembled by charon."""
    ours_ns, ns = charon_ns
    conns = charon_conn("out", initiator=True, ike_opts="fragmentation = yes")
    ch = start_charon(ns, conns, rsa_keys, "fragment_size = 600")

    async def go() -> None:
        svc = our_service(
            ours_ns, rsa_keys[0], peer_keys={THEIRS: rsa_keys[1].private.public_key()}
        )
        await svc.start(ike_config(fragment_size=300))
        assert svc.endpoint is not None
        try:
            out = await asyncio.to_thread(ch.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            log = ch.log()
            split = re.search(FRAGMENT_SPLIT, log)
            assert split is not None, log
            n_theirs = int(split.group(2))
            assert n_theirs >= 2
            assert re.search(r"generating IKE_AUTH request 1 \[ EF\(1/\d+\) \]", log), log
            got = re.search(FRAGMENT_REASSEMBLED, log)
            assert got is not None, log
            assert int(got.group(2)) >= 3 and int(got.group(3)) > 600, got.group(0)
            # IKE_SA_INIT request + every fragment of the IKE_AUTH request reached us
            assert svc.endpoint.counters.received == 1 + n_theirs
            await until("our responder has the Child SA", lambda: len(children(svc)) == 1)
            (row,) = svc.rows()
            assert row.remote_auth == "digital_signature(RSA-4096)"
            (ev,) = children(svc).values()
            assert charon_child_spis(await sas(ch)) == [(ev.spi_out.hex(), ev.spi_in.hex())]
            assert_child_keys_logged(ch, ev, initiator=False)
            await svc.down(THEIRS)
        finally:
            await svc.stop()

    asyncio.run(go())


# --------------------------------------------------------------------------- liveness


def test_liveness_check_fails_when_charon_dies(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """dpd_delay 1 s: while charon lives it answers our empty INFORMATIONAL and the SA
    stays; once charon is killed (SIGKILL, no Delete) the next check goes unanswered,
    the IKE SA fails and its Child SA is reported with the dead peer (``peer_dead``)."""
    ours_ns, ns = charon_ns
    ch = start_charon(ns, charon_conn("in", initiator=False), ec_keys)

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0])
        async with running(
            svc, ike_config(dpd_delay=1.0, retransmit_timeout=0.2, retransmit_tries=2)
        ):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            (ev,) = children(svc).values()
            await until(
                "charon answered a liveness check",
                lambda: re.search(r"parsed INFORMATIONAL request \d+ \[ \]", ch.log()) is not None,
                3.0,
            )
            await asyncio.sleep(0.1)
            assert p.state == "established" and svc.sas == [p]

            assert ch.proc is not None
            os.killpg(ch.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(ch.proc.wait, 5)
            ch.proc = None
            t0 = time.monotonic()
            await until("our IKE SA torn down", lambda: svc.sas == [], 5.0)
            took = time.monotonic() - t0
            assert p.state == "failed" and p.error, p.error
            (dead,) = sink(svc).dead  # one dead-peer report, not per-Child-SA deletes
            assert dead[0] == THEIRS and [d.spi_in for d in dead[1]] == [ev.spi_in]
            assert sink(svc).deleted == []
            assert took < 4.0, took

    asyncio.run(go())


# --------------------------------------------------------------------------- collision with charon

#: nftables in charon's namespace: drop charon's IKE *requests* (Response flag, bit 0x20
#: of the IKE header's flags byte, clear) on UDP 4500 (8 bytes UDP + 4 non-ESP marker
#: + 19 bytes into the IKE header = bit 248); its responses still pass.
HOLD_REQUESTS = """table inet hold {
 chain out {
  type filter hook output priority 0;
  udp dport 4500 @th,64,32 0 @th,250,1 0 drop
 }
}
"""


@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekey_collision_with_charon(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key], what: str
) -> None:
    """Both ends rekey the same Child SA (or the IKE SA) at once: charon's request is
    held back (its outgoing requests are dropped for 0.3 s, so it retransmits after
    1 s) while ours reaches it during its own rekey, which charon reports as a
    collision. Afterwards exactly one consistent Child SA and IKE SA remain, with keys
    equal to charon's log."""
    ours_ns, ns = charon_ns
    ch = start_charon(ns, charon_conn("in", initiator=False), ec_keys)
    task = {"child": "CHILD_REKEY", "ike": "IKE_REKEY"}[what]

    def nft(script: str) -> None:
        p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                           capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        assert p.returncode == 0, p.stderr

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0])
        async with running(svc, ike_config()):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            (first,) = children(svc).values()
            old_ike = ike_spis(svc)
            await asyncio.to_thread(nft, HOLD_REQUESTS)
            if what == "child":
                await asyncio.to_thread(ch.swanctl, "--rekey", "--child", "in-c")
                p.handle.sa.rekey_child(first.spi_in, svc.now())
            else:
                await asyncio.to_thread(ch.swanctl, "--rekey", "--ike", "in")
                p.handle.sa.rekey(svc.now())
            flush(svc, p)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(nft, "delete table inet hold\n")
            await asyncio.sleep(1.4)  # past charon's retransmission (1 s) and what follows

            def consistent(listing: str) -> bool:
                mine = [(e.spi_out.hex(), e.spi_in.hex()) for e in children(svc).values()]
                return (
                    len(mine) == 1
                    and charon_child_spis(listing) == mine
                    and charon_ike_spis(listing) == [ike_spis(svc)]
                )

            deadline = time.monotonic() + 3.0
            while not consistent(listing := await sas(ch)) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert f"detected {task} collision with {task}" in ch.log(), ch.log()[-3000:]

            assert consistent(listing), (listing, children(svc), ike_spis(svc))
            (ev,) = children(svc).values()
            if what == "child":
                assert ev.spi_in != first.spi_in and ike_spis(svc) == old_ike
                # whoever's exchange made the survivor is the "initiator" of its keys
                logged = [g for g in ch.key_log() if "encryption initiator key" in g]
                pair = {ev.encr_key_in, ev.encr_key_out}
                assert any(
                    {g["encryption initiator key"], g["encryption responder key"]} == pair
                    for g in logged
                ), "the surviving Child SA's keys are not in charon's log"
            else:
                assert ev.spi_in == first.spi_in and ike_spis(svc) != old_ike
                assert_ike_keys_logged(ch, p)
            assert p.error is None and p.state == "established"
            await svc.down(THEIRS)

    asyncio.run(go())


# --------------------------------------------------------------------------- PFS group


@pytest.mark.parametrize("rekeyer", ["ours", "charon"])
@pytest.mark.parametrize("charon_esp", ["aes256gcm16-modp2048", "aes256gcm16"])
def test_child_rekey_pfs_group_other_than_the_ike_sas(
    start_charon: StartCharon,
    charon_ns: tuple[str, str],
    ec_keys: tuple[Key, Key],
    rekeyer: str,
    charon_esp: str,
) -> None:
    """The IKE SA uses X25519 but charon's Child SA proposals demand MODP-2048 for PFS,
    or no PFS at all (strongSwan's default). Our rekey guesses the IKE SA's group and
    retries with MODP-2048 after INVALID_KE_PAYLOAD, or without KE after
    NO_PROPOSAL_CHOSEN; charon's rekeys (KE MODP-2048, or none) are accepted by our
    responder. Found by this test: we offered only the IKE SA's group and insisted on
    PFS, so every such rekey failed and the Child SA would have expired."""
    ours_ns, ns = charon_ns
    conns = charon_conn("in", initiator=False).replace(
        f"esp_proposals = {ESP}", f"esp_proposals = {charon_esp}"
    )
    ch = start_charon(ns, conns, ec_keys)

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0])
        async with running(svc, ike_config()):
            p = await svc.up(THEIRS, "pubkey", ec_keys[1].private.public_key())
            assert p.ike is not None and p.ike.dh_group == DhId.CURVE25519
            (first,) = children(svc).values()
            if rekeyer == "ours":
                p.handle.sa.rekey_child(first.spi_in, svc.now())
                flush(svc, p)
            else:
                await asyncio.to_thread(ch.swanctl, "--rekey", "--child", "in-c")
            await until("the Child SA rekeyed", lambda: len(rekeys(svc)) == 1, 4.0)
            await until("the old Child SA deleted", lambda: len(sink(svc).deleted) == 1)
            (ev,) = rekeys(svc)
            listing = await sas(ch)
            assert charon_child_spis(listing) == [(ev.spi_out.hex(), ev.spi_in.hex())], listing
            assert_child_keys_logged(ch, ev, initiator=rekeyer == "ours")
            log = ch.log()
            if charon_esp.endswith("modp2048"):
                assert "ESP:AES_GCM_16-256/MODP_2048" in listing, listing
                if rekeyer == "ours":
                    assert "DH group CURVE_25519 unacceptable, requesting MODP_2048" in log
            else:  # charon refuses PFS: our second request goes without KE
                assert "ESP:AES_GCM_16-256\n" in listing, listing
                if rekeyer == "ours":
                    assert re.search(
                        r"generating CREATE_CHILD_SA response \d+ \[ N\(NO_PROP\) \]", log
                    )
                    assert re.search(
                        r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No TSi TSr \]", log
                    )
            assert p.error is None
            await svc.down(THEIRS)

    asyncio.run(go())


# --------------------------------------------------------------------------- more Child SAs


def test_charon_adds_a_child_sa_on_our_responders_ike_sa(
    start_charon: StartCharon, charon_ns: tuple[str, str], ec_keys: tuple[Key, Key]
) -> None:
    """After its first Child SA charon asks for a second one (TCP to our port 80 only)
    with CREATE_CHILD_SA; our responder narrows nothing away, both sides list both,
    keys agree; charon closes the second one again."""
    ours_ns, ns = charon_ns
    conns = charon_conn("out", initiator=True).replace(
        "mode = tunnel",
        "mode = tunnel }\n    out-web { local_ts = dynamic[tcp]\n"
        f"      remote_ts = dynamic[tcp/80]\n      esp_proposals = {ESP}",
    )
    ch = start_charon(ns, conns, ec_keys)

    async def go() -> None:
        svc = our_service(ours_ns, ec_keys[0], peer_keys={THEIRS: ec_keys[1].private.public_key()})
        async with running(svc, ike_config()):
            out = await asyncio.to_thread(ch.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            await until("the first Child SA", lambda: len(children(svc)) == 1)
            out = await asyncio.to_thread(ch.initiate, "out-web")
            assert "initiate completed successfully" in out, out
            assert re.search(r"generating CREATE_CHILD_SA request \d+ \[ SA No KE TSi TSr \]",
                             ch.log())  # fmt: skip
            await until("the second Child SA", lambda: len(children(svc)) == 2)
            assert len(svc.sas) == 1, "a second IKE SA instead of a Child SA on the first"
            web = next(e for e in children(svc).values() if e.ts_local[0].ip_protocol == TCP)
            assert (web.ts_local[0].start_port, web.ts_local[0].end_port) == (80, 80)
            assert web.ts_remote[0].ip_protocol == TCP
            listing = await sas(ch)
            assert sorted(charon_child_spis(listing)) == sorted(
                (e.spi_out.hex(), e.spi_in.hex()) for e in children(svc).values()
            ), listing
            assert "10.0.4.1/32[tcp/http]" in listing, listing
            assert_child_keys_logged(ch, web, initiator=False)
            await asyncio.to_thread(ch.swanctl, "--terminate", "--child", "out-web")
            await until("charon's Delete of the second", lambda: len(children(svc)) == 1)
            assert web.spi_in not in children(svc)
            await svc.down(THEIRS)

    asyncio.run(go())
