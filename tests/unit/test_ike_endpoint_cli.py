"""`oe up` / `oe down` / `oe status` against a real Daemon running the IKE service.

The daemon (control socket, service registry) runs in a thread with our IKE
service bound to 127.0.0.1; a second IKE service in the same loop is the peer.
Nothing is canned: the CLI's output comes from a real IKE exchange over UDP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oe_router.cli import main
from oe_router.config.schema import OeConfig
from oe_router.daemon import Daemon, ServiceRegistry
from oe_router.ike.service import IkeService


class Lab:
    """Our daemon (with the IKE service) and a peer IKE service, in this thread's loop.

    The daemon needs the main thread (signal handlers); the blocking CLI runs in a
    worker thread via ``cli``.
    """

    def __init__(self, tmp: Path, peer_key: ec.EllipticCurvePrivateKey) -> None:
        self.sock = tmp / "control.sock"
        self.ours = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
        self.peer = IkeService(
            ["127.0.0.1"],
            ike_port=0,
            natt_port=0,
            private_key=peer_key,
            local_id="@peer.example",
        )
        self.daemon = Daemon(
            tmp / "oe.conf", OeConfig(), ServiceRegistry([self.ours]), self.sock, pid=1
        )
        self.ours.register_commands(self.daemon.commands)

    async def __aenter__(self) -> Lab:
        await self.peer.start(OeConfig())
        self.task = asyncio.create_task(self.daemon.run())
        async with asyncio.timeout(5):
            while self.ours.endpoint is None or not self.sock.exists():
                await asyncio.sleep(0.01)
        assert self.peer.endpoint is not None
        self.ours.remote_ike_port = self.peer.endpoint.ike_port
        self.ours.remote_natt_port = self.peer.endpoint.natt_port
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        await self.task
        await self.peer.stop()

    async def cli(self, *argv: str) -> int:
        return await asyncio.to_thread(main, ["--socket", str(self.sock), *argv])


@pytest.fixture
def keyfile(tmp_path: Path) -> Iterator[tuple[ec.EllipticCurvePrivateKey, Path]]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "peer.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    yield key, path


def test_oe_up_status_down(
    tmp_path: Path,
    keyfile: tuple[ec.EllipticCurvePrivateKey, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, path = keyfile
    asyncio.run(_up_status_down(tmp_path, key, path, capsys))


async def _up_status_down(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Lab(tmp_path, key) as d:
        assert await d.cli("up", "127.0.0.1", "--peer-key", str(path)) == 0
        out = capsys.readouterr().out
        assert out.startswith("127.0.0.1: IKE SA up (initiator, AES_GCM_16_256/")
        assert "auth null/digital_signature(ECDSA-P256)" in out and "tunnel AES_GCM_16_256" in out
        assert await d.cli("status") == 0
        table = capsys.readouterr().out
        assert "ike sas (1)" in table and "ids %null <-> @peer.example" in table
        assert "tunnels (0)" in table  # the OE manager's table; IKE SAs have their own
        assert "rekey-in" in table and "127.0.0.1/32" in table
        assert await d.cli("status", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        (row,) = doc["tunnels"]
        assert row["source"] == "ike" and row["remote_id"] == "@peer.example"
        assert len(row["children"]) == 1 and row["children"][0]["mode"] == "tunnel"
        assert await d.cli("down", "127.0.0.1") == 0
        assert capsys.readouterr().out == "127.0.0.1: 1 IKE SA(s) deleted\n"
        assert await d.cli("down", "127.0.0.1") == 1
        assert capsys.readouterr().err == "oe: down: no IKE SA with 127.0.0.1\n"


def test_oe_up_prints_why_not(
    tmp_path: Path,
    keyfile: tuple[ec.EllipticCurvePrivateKey, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _ = keyfile
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    asyncio.run(_why_not(tmp_path, key, wrong, capsys))


async def _why_not(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, wrong: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Lab(tmp_path, key) as d:
        assert await d.cli("up", "127.0.0.1", "--peer-key", str(wrong)) == 1
        err = capsys.readouterr().err
        assert err.startswith("oe: up: peer 127.0.0.1: ") and "authentication failed" in err
        assert await d.cli("up", "127.0.0.1", "--peer-key", "/nonexistent.pem") == 1
        assert capsys.readouterr().err == (
            "oe: --peer-key /nonexistent.pem: No such file or directory\n"
        )
        assert await d.cli("up", "127.0.0.1", "--auth", "pubkey") == 1
        assert "auth pubkey needs our private key" in capsys.readouterr().err
