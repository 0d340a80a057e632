"""The IKE manager service on loopback: our initiator and our responder over real UDP.

Two ``IkeService`` instances share 127.0.0.1 on kernel-chosen ports; XFRM hooks
off (no root needed). Checks ``up``/``down``, one IKE SA per peer, the sink,
status rows and the control commands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from oe_router.config.schema import OeConfig
from oe_router.control.protocol import CommandTable
from oe_router.control.status import Status, TunnelStatus
from oe_router.datapath import base as dp
from oe_router.ike.service import IkeService, IkeUpError, RecordingSink
from oe_router.oe.sa_spec import child_sa_spec
from tests.aio import running
from tests.ike_loop import linked, run_async

LO = "127.0.0.1"


@asynccontextmanager
async def two(**kw: Any) -> AsyncIterator[tuple[IkeService, IkeService]]:
    a = IkeService(["127.0.0.1"], ike_port=0, natt_port=0, **kw.get("a", {}))
    b = IkeService(["127.0.0.1"], ike_port=0, natt_port=0, **kw.get("b", {}))
    async with linked(a, b):
        yield a, b


async def settle() -> None:
    await asyncio.sleep(0.05)


@run_async
async def test_up_null_reuses_one_ike_sa_then_down() -> None:
    async with two() as (a, b):
        p = await a.up("127.0.0.1")
        assert p.state == "established" and len(p.children) == 1
        again = await a.up("127.0.0.1")
        assert again is p and len(a.sas) == 1  # one IKE SA per peer
        await settle()
        assert isinstance(a.sink, RecordingSink) and isinstance(b.sink, RecordingSink)
        ((_, ca),) = a.sink.established
        ((_, cb),) = b.sink.established
        assert ca.spi_in == cb.spi_out and ca.encr_key_out == cb.encr_key_in
        (row,) = a.rows()
        assert (row.source, row.role, row.state) == ("ike", "initiator", "established")
        assert (row.local_id, row.remote_id, row.local_auth, row.remote_auth) == (
            "%null",
            "%null",
            "null",
            "null",
        )
        assert row.transform == "AES_GCM_16_256/HMAC_SHA2_256/CURVE25519"
        assert row.ike_spis == f"{p.handle.sa.spi_i.hex()}_i {p.handle.sa.spi_r.hex()}_r"
        assert row.rekey_in_s is not None and 0 < row.rekey_in_s <= 8 * 3600
        (child,) = row.children
        assert child.spi_in == ca.spi_in.hex() and child.ts_remote == "127.0.0.1/32"
        (rrow,) = b.rows()
        assert rrow.role == "responder" and rrow.ike_spis == row.ike_spis
        assert await a.down("127.0.0.1") == 1
        await settle()
        assert a.sas == [] and b.sas == []
        assert [c.spi_in for _, c in a.sink.deleted] == [ca.spi_in]
        assert [c.spi_in for _, c in b.sink.deleted] == [cb.spi_in]


@run_async
async def test_pubkey_both_ways_and_wrong_key_is_refused_with_reason() -> None:
    ka, kb = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    async with two(
        a={"private_key": ka, "local_id": "@a.example"},
        b={
            "private_key": kb,
            "local_id": "@b.example",
            "peer_keys": {"127.0.0.1": ka.public_key()},
        },
    ) as (a, _):
        p = await a.up("127.0.0.1", "pubkey", kb.public_key())
        (row,) = a.rows()
        assert (row.local_id, row.remote_id) == ("@a.example", "@b.example")
        assert row.local_auth == "digital_signature(ECDSA-P256)"
        assert row.remote_auth == "digital_signature(Ed25519)"
        await a.down("127.0.0.1")
        assert p.state != "established"
        wrong = ed25519.Ed25519PrivateKey.generate().public_key()
        with pytest.raises(IkeUpError, match=r"127\.0\.0\.1: .*authentication failed"):
            await a.up("127.0.0.1", "pubkey", wrong)


@run_async
async def test_up_refuses_pubkey_without_a_key_and_names_the_file() -> None:
    async with two() as (a, _):
        with pytest.raises(IkeUpError, match=r"private key .*private\.pem"):
            await a.up("127.0.0.1", "pubkey")


@run_async
async def test_control_commands_up_and_down() -> None:
    async with two() as (a, _):
        table = CommandTable()
        a.register_commands(table)

        async def ask(**req: Any) -> dict[str, Any]:
            out: dict[str, Any] = await table.dispatch(json.dumps(req).encode())
            return out

        bad = await ask(cmd="up", peer="127.0.0.1", auth="psk")
        assert bad == {"ok": False, "error": "up: auth 'psk': use null or pubkey"}
        bad = await ask(cmd="up", peer="127.0.0.1", peer_key="not a key")
        assert not bad["ok"] and bad["error"].startswith("up: peer_key: not a PEM public key")
        ok = await ask(cmd="up", peer="127.0.0.1")
        assert ok["ok"] and ok["ike"]["state"] == "established"
        row = TunnelStatus.from_json(ok["ike"])
        assert row.children and row.children[0].mode == "tunnel"
        status = Status.from_json(
            json.loads(json.dumps({**_empty_status(), "tunnels": [ok["ike"]]}))
        )
        assert status.tunnels[0].children == row.children
        assert (await ask(cmd="down", peer="127.0.0.1")) == {"ok": True, "deleted": 1}
        gone = await ask(cmd="down", peer="127.0.0.1")
        assert gone == {"ok": False, "error": "down: no IKE SA with 127.0.0.1"}


def _empty_status() -> dict[str, Any]:
    return {
        "daemon": {
            "version": "x",
            "pid": 1,
            "uptime_s": 0,
            "config_path": "/x",
            "config_generation": 1,
            "enabled": True,
            "datapath": "none",
        },
        "tunnels": [],
        "shunts": [],
        "engines": [],
        "dns": {},
    }


@run_async
async def test_child_sa_spec_for_the_datapath() -> None:
    async with two() as (a, _):
        await a.up("127.0.0.1")
        assert isinstance(a.sink, RecordingSink)
        ((_, ev),) = a.sink.established
        spec = child_sa_spec(ev, "127.0.0.1", "127.0.0.1")
        assert spec.inbound.spi == int.from_bytes(ev.spi_in, "big")
        assert spec.encr.kernel_name == "rfc4106(gcm(aes))" and spec.integ is None
        assert spec.mode is dp.Mode.TUNNEL and spec.encap is None
        assert [str(t.net) for t in spec.remote_ts] == ["127.0.0.1/32"]


def test_bad_key_files_are_one_clear_error() -> None:
    from oe_router.ike.service import load_private_key, load_public_key

    with pytest.raises(ValueError, match=r"^k\.pem: not a usable PEM private key"):
        load_private_key(b"junk", "k.pem")
    pub = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert load_public_key(pub, "p.pem") is not None


@run_async
async def test_second_child_rides_the_same_ike_sa() -> None:
    """After its only Child SA is deleted, ``up`` asks for a new one with CREATE_CHILD_SA
    on the IKE SA it has, instead of opening a second IKE SA."""
    async with two() as (a, b):
        p = await a.up(LO)
        (first,) = list(p.children)
        assert a.endpoint is not None
        p.handle.sa.delete_child(first, a._clock())
        a.endpoint.flush(p.handle)
        await settle()
        assert p.children == {}
        again = await a.up(LO)
        assert again is p and len(a.sas) == 1 and len(b.sas) == 1
        (second,) = list(p.children)
        assert second != first
        assert isinstance(b.sink, RecordingSink)
        assert [c.spi_out for _, c in b.sink.established] == [first, second]
        (row,) = a.rows()
        assert row.children[0].rekey_in_s is not None and row.rekey_in_s is not None


@run_async
async def test_responder_confines_a_peer_to_its_own_address() -> None:
    """Containment: an initiator asking for a Child SA for an address that is not its own
    gets TS_UNACCEPTABLE; the IKE SA itself stays up."""
    from oe_router.ike.constants import NotifyType
    from oe_router.ike.events import ChildSaFailed
    from oe_router.ike.service import host_selector

    async with two() as (a, b):
        assert a.endpoint is not None and b.endpoint is not None
        seen: list[object] = []
        a.endpoint._on_event = lambda h, ev: seen.append(ev)  # record, bypass the service
        cfg = a._sa_config(
            ("127.0.0.1", a.endpoint.ike_port), ("127.0.0.1", b.endpoint.ike_port), "null", None,
            False,
        )  # fmt: skip
        cfg = dataclasses.replace(cfg, local_ts=(host_selector("192.0.2.99"),))
        a.endpoint.initiate(cfg, remote_natt_port=b.endpoint.natt_port)
        async with asyncio.timeout(5):
            while not any(isinstance(e, ChildSaFailed) for e in seen):
                await asyncio.sleep(0.01)
        (failed,) = [e for e in seen if isinstance(e, ChildSaFailed)]
        assert isinstance(failed, ChildSaFailed) and failed.notify == NotifyType.TS_UNACCEPTABLE
        assert isinstance(b.sink, RecordingSink) and b.sink.established == []
        assert [r.state for r in b.rows()] == ["established"] and not b.rows()[0].children


@run_async
async def test_ipv6_up_and_down() -> None:
    a = IkeService(["::1"], ike_port=0, natt_port=0)
    b = IkeService(["::1"], ike_port=0, natt_port=0)
    async with running(a, OeConfig()), running(b, OeConfig()):
        assert a.endpoint is not None and b.endpoint is not None
        a.remote_ike_port, a.remote_natt_port = b.endpoint.ike_port, b.endpoint.natt_port
        p = await a.up("::1")
        (row,) = a.rows()
        assert row.children[0].ts_remote == "::1/128" and row.remote.startswith("::1[")
        assert await a.down("::1") == 1 and p.state != "established"


@run_async
async def test_set_esp_proposals_reaches_live_sas_and_rekey_child_moves_or_is_refused() -> None:
    """``set_esp_proposals`` changes what live IKE SAs offer; ``rekey_child`` rekeys one
    Child SA onto it (None: the old SA is on its way out), or reports REKEY_REFUSED when
    the peer takes none of it (as libreswan does for a rekey that changes algorithms)."""
    from oe_router.ike.constants import EncrId
    from oe_router.ike.proposals import esp_offer
    from oe_router.ike.service import REKEY_REFUSED

    async with two() as (a, b):
        p = await a.up(LO)
        await settle()
        (spi_in,) = p.children
        assert p.children[spi_in].event.encr == EncrId.AES_GCM_16
        a.set_esp_proposals(esp_offer(("chacha20poly1305",)))
        assert p.handle.sa.config.esp_proposals == esp_offer(("chacha20poly1305",))
        assert await a.rekey_child(LO, spi_in, timeout=5.0, settle=0.3) is None
        await settle()
        (new,) = p.children
        assert new != spi_in and p.children[new].event.encr == EncrId.CHACHA20_POLY1305
        b.set_esp_proposals(esp_offer(("chacha20poly1305",)))  # the peer: nothing else
        a.set_esp_proposals(esp_offer(("aes128-sha256",)))
        assert await a.rekey_child(LO, new, timeout=5.0, settle=0.3) == REKEY_REFUSED
        assert list(p.children) == [new]  # the old SA stays when the move is refused
        assert "no IKE SA" in str(await a.rekey_child(LO, b"\0\0\0\1", timeout=1, settle=0.1))


@pytest.mark.parametrize(
    "key", [None, ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()]
)
def test_warm_negotiates_on_the_loopback_and_leaves_nothing(key: Any) -> None:
    """The warm-up runs a whole IKE SA and Child SA with the service's own proposals and
    key (NULL auth without one) between throwaway endpoints: the service's peer table,
    sink, counters and SAs see none of it."""

    async def go() -> None:
        a = IkeService(["127.0.0.1"], ike_port=0, natt_port=0, private_key=key)
        async with running(a, OeConfig()):
            assert a.endpoint is not None
            before = dataclasses.asdict(a.endpoint.counters)
            took = await a.warm()
            assert took is not None and 0 < took < 10
            assert a.sas == [] and not a.rows()
            assert isinstance(a.sink, RecordingSink) and a.sink.established == []
            assert dataclasses.asdict(a.endpoint.counters) == before
            assert a.endpoint.handles() == []

    asyncio.run(go())


def test_warm_without_a_loopback_says_so_and_returns_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the loopback cannot carry the warm-up (a namespace with ``lo`` down, say) it
    gives up within its timeout, logs at debug, and the service serves on."""

    async def go() -> None:
        a = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
        async with running(a, OeConfig()):
            assert a.endpoint is not None
            own = {a.endpoint.ike_port, a.endpoint.natt_port}
            real = socket.socket.sendto

            def unreachable(self: socket.socket, *args: Any) -> int:
                if self.getsockname()[1] not in own:
                    raise OSError(errno.ENETUNREACH, "Network is unreachable")
                return real(self, *args)

            monkeypatch.setattr(socket.socket, "sendto", unreachable)
            with caplog.at_level(logging.DEBUG, logger="oe_router.ike"):
                assert await a.warm(timeout=1.0) is None
            assert "IKE warm-up on the loopback: " in caplog.text
            assert a.sas == [] and a.endpoint is not None

    asyncio.run(go())
