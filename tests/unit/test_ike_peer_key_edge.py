"""The responder's key lookup by initiator identity over real UDP on 127.0.0.1: two
IkeServices in one loop, ours with no key for the peer's address and an injected
lookup (the daemon injects the DNS front's; dns/identity_keys.py is tested apart).
A found key brings the IKE SA up; none, a wrong one, a lookup that never answers, or
no lookup at all fail the initiator's ``up`` with AUTHENTICATION_FAILED.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from oe_router.config.schema import OeConfig
from oe_router.ike.auth import PublicKey
from oe_router.ike.constants import AuthMethod, IdType, NotifyType
from oe_router.ike.events import IkeSaEstablished
from oe_router.ike.peer_keys import PeerKeyLookup
from oe_router.ike.peers import IkeUpError
from oe_router.ike.service import IkeService

ALICE = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


async def _run(
    lookup: PeerKeyLookup | None, timeout: float = 3.0
) -> tuple[list[IkeSaEstablished], object, tuple[object, object]]:
    """Alice (signing as alice.example) brings an IKE SA up with us: what our side
    established, what her ``up`` gave (the PeerSa, or the IkeUpError), and our `oe
    status` counts of initiator keys found and refused."""
    ours = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
    alice = IkeService(
        ["127.0.0.1"], ike_port=0, natt_port=0, private_key=ALICE, local_id="@alice.example"
    )
    ours.peer_key_lookup = lookup
    ours.key_lookups.timeout = timeout
    await ours.start(OeConfig())
    await alice.start(OeConfig())
    try:
        assert ours.endpoint is not None
        alice.remote_ike_port = ours.endpoint.ike_port
        alice.remote_natt_port = ours.endpoint.natt_port
        try:
            result: object = await alice.up("127.0.0.1", "pubkey")
        except IkeUpError as exc:
            result = exc
        # the key authenticated that SA's identity only: nothing is known by address now
        assert ours.peer_keys == {}
        ike = ours.status().ike
        counts = (ike["peer_key_lookups_found"], ike["peer_key_lookups_refused"])
        return [p.ike for p in ours.sas if p.ike is not None], result, counts
    finally:
        await alice.stop()
        await ours.stop()


def _answer(key: PublicKey | None, why: str, delay: float = 0.05) -> PeerKeyLookup:
    asked: list[str] = []

    async def lookup(name: str) -> tuple[PublicKey | None, str]:
        asked.append(name)
        await asyncio.sleep(delay)
        return key, why

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


def test_found_key_brings_the_sa_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oe_router.ike")
    # 0.6 s: longer than the first retransmission of IKE_AUTH (0.4 s), which is absorbed
    lookup = _answer(ALICE.public_key(), "IPSECKEY of alice.example, DNSSEC secure", 0.6)
    ours, result, counts = asyncio.run(_run(lookup))
    assert not isinstance(result, IkeUpError), result
    assert counts == (1, 0)
    assert lookup.asked == ["alice.example"]  # type: ignore[attr-defined]  # once, despite resends
    lines = [r.getMessage() for r in caplog.records if "IKE_AUTH from" in r.getMessage()]
    assert lines == [
        "IKE_AUTH from 127.0.0.1 as alice.example: key found "
        "(IPSECKEY of alice.example, DNSSEC secure)"
    ]
    (up,) = ours
    assert up.peer_id == (IdType.ID_FQDN, b"alice.example")
    assert up.peer_auth_method == AuthMethod.DIGITAL_SIGNATURE


@pytest.mark.parametrize(
    ("lookup", "why"),
    [
        (_answer(None, "IPSECKEY of alice.example is bogus"), "is bogus"),
        (_answer(OTHER.public_key(), "IPSECKEY of alice.example"), None),
        (_answer(ALICE.public_key(), "late", delay=30.0), "no answer within 0.5s"),
        (None, "no key lookup for initiator identities"),
    ],
    ids=["bogus", "wrong-key", "timeout", "no-lookup"],
)
def test_no_or_wrong_key_fails_with_authentication_failed(
    lookup: PeerKeyLookup | None, why: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oe_router.ike")
    ours, result, counts = asyncio.run(_run(lookup, timeout=0.5))
    assert ours == []
    assert counts == ((1, 0) if why is None else (0, 1))  # a wrong key was found, then failed
    assert isinstance(result, IkeUpError), result
    assert result.notify == NotifyType.AUTHENTICATION_FAILED
    lines = [r.getMessage() for r in caplog.records if "IKE_AUTH from 127.0.0.1" in r.getMessage()]
    assert len(lines) == 1
    if why is not None:
        assert "refused" in lines[0] and why in lines[0]
