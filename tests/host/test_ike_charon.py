"""IKE interop with real strongSwan charon 5.9.8 in network namespaces, and ours with ours.

Each pair runs over real UDP between namespaces joined by veth links; our side is
the real ``IkeService`` (endpoint with XFRM bypass policies and ESP-in-UDP on its
4500 socket) running in this process with its sockets inside its namespace.
Keys are checked against charon's level-4 key log (the host kernel has no ESP, so
pushing ESP through waits for the userspace datapath or the QEMU tier).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_router.config.schema import OeConfig
from oe_router.datapath.kernel import XfrmSocketHooks
from oe_router.ike.auth import PrivateKey, PublicKey
from oe_router.ike.constants import EncrId, IntegId
from oe_router.ike.events import ChildSaEstablished
from oe_router.ike.sa import EspProposalSpec
from oe_router.ike.service import IkeService, RecordingSink
from tests.aio import running

from .charon import Charon, Netns

SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP = 17, 100, 2  # <linux/udp.h>

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("need_charon")]

KINDS = ("rsa", "ecdsa", "ed25519")
ESP = "aes256gcm16, aes256-sha256"
IKE = "aes256gcm16-prfsha256-ecp256-x25519-modp2048, aes256-sha256-prfsha256-ecp256"


@dataclass
class Key:
    private: PrivateKey

    @property
    def public(self) -> PublicKey:
        return self.private.public_key()

    def pkcs8(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def spki(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(kind: str) -> Key:
    if kind == "rsa":
        return Key(rsa.generate_private_key(65537, 2048))
    if kind == "ecdsa":
        return Key(ec.generate_private_key(ec.SECP256R1()))
    return Key(ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[Key, Key]]:
    """(ours, charon's) per key kind."""
    return {k: (new_key(k), new_key(k)) for k in KINDS}


def conn(
    name: str,
    kind: str,
    *,
    local: str,
    remote: str,
    local_id: str,
    remote_id: str,
    remote_ts: str = "dynamic",
) -> str:
    return f"""
  {name} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = {IKE}
    unique = never
    local {{ auth = pubkey
      pubkeys = charon-{kind}.pem
      id = {local_id} }}
    remote {{ auth = pubkey
      pubkeys = ours-{kind}.pem
      id = {remote_id} }}
    children {{ {name}-c {{ local_ts = dynamic
      remote_ts = {remote_ts}
      esp_proposals = {ESP}
      mode = tunnel }} }}
  }}"""


def charon_files(keys: dict[str, tuple[Key, Key]]) -> dict[str, Any]:
    return {
        "pubkeys": {
            **{f"ours-{k}.pem": keys[k][0].spki() for k in KINDS},
            **{f"charon-{k}.pem": keys[k][1].spki() for k in KINDS},
        },
        "privkeys": {f"charon-{k}.pem": keys[k][1].pkcs8() for k in KINDS},
    }


@dataclass
class Direct:
    net: Netns
    ours: str
    charon: Charon


@pytest.fixture(scope="module")
def direct(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Key, Key]]
) -> Iterator[Direct]:
    """ours (10.0.0.1) --veth-- charon (10.0.0.2), charon loaded with a responder conn
    per key kind and one initiator conn towards us."""
    net = Netns("d")
    try:
        o, c = net.add("o"), net.add("c")
        net.link(o, "10.0.0.1/24", c, "10.0.0.2/24")
        conns = "".join(
            conn(f"in-{k}", k, local="10.0.0.2", remote="%any",
                 local_id=f"charon-{k}.example", remote_id=f"router-{k}.example")
            for k in KINDS
        ) + conn("out", "ecdsa", local="10.0.0.2", remote="10.0.0.1",
                 local_id="charon-init.example", remote_id="router-resp.example")  # fmt: skip
        ch = Charon(c, tmp_path_factory.mktemp("charon-direct"), conns, **charon_files(keys))
        ch.start()
        try:
            yield Direct(net, o, ch)
        finally:
            ch.stop()
    finally:
        net.close()


def service(ns: str, address: str, **kw: Any) -> IkeService:
    """Our IKE service in ``ns`` with the XFRM socket hooks, as the daemon wires it."""
    kw.setdefault("socket_hooks", (XfrmSocketHooks(),))
    return IkeService([address], netns=ns, **kw)


def ours_keys(ev: ChildSaEstablished, initiator: bool) -> dict[str, bytes]:
    """Our Child SA keys under charon's names."""
    i_enc, r_enc = (
        (ev.encr_key_out, ev.encr_key_in) if initiator else (ev.encr_key_in, ev.encr_key_out)
    )
    out = {"encryption initiator key": i_enc, "encryption responder key": r_enc}
    if ev.integ_key_in:
        i_int, r_int = (
            (ev.integ_key_out, ev.integ_key_in)
            if initiator
            else (ev.integ_key_in, ev.integ_key_out)
        )
        out |= {"integrity initiator key": i_int, "integrity responder key": r_int}
    return out


def assert_keys_agree(ch: Charon, ev: ChildSaEstablished, initiator: bool) -> None:
    ours = ours_keys(ev, initiator)
    groups = [g for g in ch.key_log() if "encryption initiator key" in g]
    assert groups, "charon logged no Child SA keys"
    match = [g for g in groups if all(g.get(k) == v for k, v in ours.items())]
    assert match, f"no charon key group equals ours ({len(groups)} groups logged)"


def charon_child_spis(sas: str) -> list[tuple[str, str]]:
    """(charon's inbound SPI, its outbound SPI) of every Child SA it lists."""
    return re.findall(r"\bin  ([0-9a-f]{8}),.*\n\s+out ([0-9a-f]{8}),", sas)


# --------------------------------------------------------------------------- our initiator


@pytest.mark.parametrize("kind", KINDS)
def test_our_initiator_charon_responder_pubkey(
    direct: Direct, keys: dict[str, tuple[Key, Key]], kind: str
) -> None:
    """RFC 7427 signatures both ways (RSA, ECDSA P-256, Ed25519), tunnel mode."""
    ours, theirs = keys[kind]

    async def go() -> None:
        hooks = XfrmSocketHooks()
        svc = service(
            direct.ours,
            "10.0.0.1",
            private_key=ours.private,
            local_id=f"@router-{kind}.example",
            socket_hooks=(hooks,),
        )
        async with running(svc, OeConfig()):
            assert svc.endpoint is not None
            assert hooks.note.startswith("bypass policies on"), hooks.note
            p = await svc.up("10.0.0.2", "pubkey", theirs.public)
            (row,) = svc.rows()
            expect = {"rsa": "RSA-2048", "ecdsa": "ECDSA-P256", "ed25519": "Ed25519"}[kind]
            assert row.local_auth == row.remote_auth == f"digital_signature({expect})"
            assert (row.local_id, row.remote_id) == (
                f"@router-{kind}.example",
                f"@charon-{kind}.example",
            )
            assert isinstance(svc.sink, RecordingSink)
            ((_, ev),) = svc.sink.established
            # kernel-libipsec only does ESP in UDP, so charon fakes its NAT_DETECTION
            # hash: we see the peer "behind a NAT", float to 4500 and agree to encap.
            assert ev.mode == "tunnel" and ev.udp_encap
            assert p.ike is not None and p.ike.nat_remote and not p.ike.nat_local
            assert p.handle.natt and p.handle.remote == ("10.0.0.2", 4500)
            raw = await asyncio.to_thread(direct.charon.list_sas, True)
            assert "nat-fake=yes" in raw and "nat-remote=yes" not in raw, raw
            sas = await asyncio.to_thread(direct.charon.list_sas)
            assert f"in-{kind}:" in sas and "ESTABLISHED" in sas and "INSTALLED" in sas, sas
            assert (ev.spi_out.hex(), ev.spi_in.hex()) in charon_child_spis(sas), sas
            assert p.handle.sa.spi_i.hex() in sas
            assert_keys_agree(direct.charon, ev, initiator=True)
            assert await svc.down("10.0.0.2") == 1
            sas = await asyncio.to_thread(direct.charon.list_sas)
            assert p.handle.sa.spi_i.hex() not in sas, "charon kept the IKE SA after our Delete"

    asyncio.run(go())


def test_our_initiator_charon_responder_aes_cbc_integrity_keys(
    direct: Direct, keys: dict[str, tuple[Key, Key]]
) -> None:
    """ESP AES-CBC + HMAC-SHA2-256-128 (charon's second choice, our only offer): the
    integrity keys must agree with charon's key log too."""
    ours, theirs = keys["ecdsa"]

    async def go() -> None:
        svc = service(
            direct.ours,
            "10.0.0.1",
            private_key=ours.private,
            local_id="@router-ecdsa.example",
            esp_proposals=(EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128),),
        )
        async with running(svc, OeConfig()):
            await svc.up("10.0.0.2", "pubkey", theirs.public)
            assert isinstance(svc.sink, RecordingSink)
            ((_, ev),) = svc.sink.established
            assert (ev.encr, ev.integ) == (EncrId.AES_CBC, IntegId.HMAC_SHA2_256_128)
            assert len(ev.integ_key_in) == 32
            assert_keys_agree(direct.charon, ev, initiator=True)
            (child,) = svc.rows()[0].children
            assert child.transform == "AES_CBC_256/HMAC_SHA2_256_128"
            await svc.down("10.0.0.2")

    asyncio.run(go())


# --------------------------------------------------------------------------- our responder


def test_charon_initiator_our_responder(direct: Direct, keys: dict[str, tuple[Key, Key]]) -> None:
    """charon initiates (swanctl --initiate); our responder knows its ECDSA key and
    confines it to its own address."""
    ours, theirs = keys["ecdsa"]

    async def go() -> None:
        svc = service(
            direct.ours,
            "10.0.0.1",
            private_key=ours.private,
            local_id="@router-resp.example",
            peer_keys={"10.0.0.2": theirs.public},
        )
        async with running(svc, OeConfig()):
            out = await asyncio.to_thread(direct.charon.initiate, "out-c")
            assert "initiate completed successfully" in out, out
            assert "authentication of 'router-resp.example' with ECDSA_WITH_SHA256_DER" in out
            await asyncio.sleep(0.05)
            (row,) = svc.rows()
            assert (row.role, row.state, row.remote_id) == (
                "responder",
                "established",
                "@charon-init.example",
            )
            assert row.remote_auth == "digital_signature(ECDSA-P256)"
            (child,) = row.children
            assert (child.ts_local, child.ts_remote) == ("10.0.0.1/32", "10.0.0.2/32")
            assert isinstance(svc.sink, RecordingSink)
            ((_, ev),) = svc.sink.established
            sas = await asyncio.to_thread(direct.charon.list_sas)
            assert (ev.spi_out.hex(), ev.spi_in.hex()) in charon_child_spis(sas), sas
            assert_keys_agree(direct.charon, ev, initiator=False)
            await svc.down("10.0.0.2")

    asyncio.run(go())


# --------------------------------------------------------------------------- NAT


def test_our_initiator_behind_masquerade_floats_to_4500(
    charon: Callable[..., Charon], keys: dict[str, tuple[Key, Key]]
) -> None:
    """ours 192.168.1.2 -> nft masquerade (192.168.1.1 | 10.0.1.1) -> charon 10.0.1.2.

    Our side must see the NAT_DETECTION mismatch, float IKE_AUTH to 4500 and
    negotiate UDP encapsulation; charon must list the SA with NAT-T."""
    ours, theirs = keys["ecdsa"]
    net = Netns("n")
    try:
        o, m, c = net.add("o"), net.add("m"), net.add("c")
        net.link(o, "192.168.1.2/24", m, "192.168.1.1/24")
        net.link(m, "10.0.1.1/24", c, "10.0.1.2/24")
        net.route(o, "192.168.1.1")
        net.masquerade(m, "10.0.1.0/24")
        ch = charon(
            c,
            conn("nat", "ecdsa", local="10.0.1.2", remote="%any",
                 local_id="charon-ecdsa.example", remote_id="router-ecdsa.example",
                 remote_ts="192.168.1.2/32"),
            **charon_files(keys),
        )  # fmt: skip

        async def go() -> None:
            svc = service(
                o,
                "192.168.1.2",
                private_key=ours.private,
                local_id="@router-ecdsa.example",
                keepalive_interval=0.2,
            )
            async with running(svc, OeConfig()):
                p = await svc.up("10.0.1.2", "pubkey", theirs.public)
                # nat_local: the masquerade really translated us (charon's
                # NAT_DETECTION_DESTINATION_IP hash of 192.168.1.2[500] mismatched);
                # nat_remote is charon's libipsec fake (see the direct tests).
                assert p.ike is not None and p.ike.nat_local
                assert p.handle.natt and p.handle.remote == ("10.0.1.2", 4500)
                assert svc.endpoint is not None and svc.endpoint.counters.floated == 1
                (row,) = svc.rows()
                assert row.nat == "local,remote" and row.local == "192.168.1.2[4500]"
                assert isinstance(svc.sink, RecordingSink)
                ((_, ev),) = svc.sink.established
                assert ev.udp_encap
                raw = await asyncio.to_thread(ch.list_sas, True)
                assert "nat-remote=yes" in raw and "nat-fake" not in raw, raw
                assert "encap=yes" in raw and "remote-ts=[192.168.1.2/32]" in raw, raw
                assert "remote-host=10.0.1.1 remote-port=" in raw, raw
                assert "local-port=4500" in raw, raw
                assert_keys_agree(ch, ev, initiator=True)
                await asyncio.sleep(0.5)  # we are the NATed side: keepalives flow
                assert svc.endpoint.counters.keepalives_out >= 2
                await svc.down("10.0.1.2")

        asyncio.run(go())
    finally:
        net.close()


# --------------------------------------------------------------------------- ours <-> ours


@pytest.fixture(scope="module")
def pair_ns() -> Iterator[tuple[str, str]]:
    net = Netns("p")
    try:
        a, b = net.add("a"), net.add("b")
        net.link(a, "10.0.2.1/24", b, "10.0.2.2/24")
        yield a, b
    finally:
        net.close()


@pytest.mark.parametrize(
    ("kind", "mode"), [(k, "tunnel") for k in ("null", *KINDS)] + [("null", "transport")]
)
def test_ours_with_ours_across_netns(
    pair_ns: tuple[str, str], keys: dict[str, tuple[Key, Key]], kind: str, mode: str
) -> None:
    """Our initiator and our responder in two namespaces over real UDP 500."""
    a_ns, b_ns = pair_ns

    async def go() -> None:
        if kind == "null":
            a, b = service(a_ns, "10.0.2.1"), service(b_ns, "10.0.2.2")
        else:
            ka, kb = keys[kind]
            a = service(a_ns, "10.0.2.1", private_key=ka.private, local_id="@a.example")
            b = service(
                b_ns,
                "10.0.2.2",
                private_key=kb.private,
                local_id="@b.example",
                peer_keys={"10.0.2.1": ka.public},
            )
        async with running(a, OeConfig()), running(b, OeConfig()):
            assert a.endpoint is not None
            ike_sock, natt_sock = a.endpoint.sockets()
            assert natt_sock.getsockopt(SOL_UDP, UDP_ENCAP) == UDP_ENCAP_ESPINUDP
            assert ike_sock.getsockopt(SOL_UDP, UDP_ENCAP) == 0
            transport = mode == "transport"
            if kind == "null":
                p = await a.up("10.0.2.2", transport=transport)
            else:
                p = await a.up("10.0.2.2", "pubkey", keys[kind][1].public, transport=transport)
            await asyncio.sleep(0.05)
            assert isinstance(a.sink, RecordingSink) and isinstance(b.sink, RecordingSink)
            ((_, ca),) = a.sink.established
            ((_, cb),) = b.sink.established
            assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in)
            assert ca.mode == cb.mode == mode
            assert (ca.encr_key_in, ca.encr_key_out) == (cb.encr_key_out, cb.encr_key_in)
            (ra,), (rb,) = a.rows(), b.rows()
            assert ra.ike_spis == rb.ike_spis and rb.role == "responder"
            want = "null" if kind == "null" else "digital_signature"
            assert ra.local_auth.startswith(want) and rb.remote_auth.startswith(want)
            assert p.handle.remote == ("10.0.2.2", 500) and not p.handle.natt
            await a.down("10.0.2.2")
            await asyncio.sleep(0.05)
            assert b.sas == [] and len(b.sink.deleted) == 1

    asyncio.run(go())
