"""Proposal-mismatch diagnostics (issue 15 item 4): when no proposal matches, the
failure events, the IKE service's log lines and ``oe status`` say what each side
offered, in strongSwan's keyword form, so an admin can see why.

Driven with the in-memory SA pair (tests/ike_pair.py): our initiator against our
responder, configured so that their proposals do not meet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from oe_router.cli import render_status
from oe_router.control.status import (
    DaemonStatus,
    ProposalOffers,
    ShuntStatus,
    Status,
    StatusContribution,
)
from oe_router.ike.constants import DhId, EncrId, IntegId, NotifyType, PrfId
from oe_router.ike.events import ChildSaFailed, IkeSaEstablished, IkeSaFailed
from oe_router.ike.payloads import Notify, Proposal, Transform
from oe_router.ike.peers import MISMATCHES_KEPT, PeerTable, RecordingSink
from oe_router.ike.proposals import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    ESP_KEYWORDS,
    MAX_TOLD,
    EspProposalSpec,
    IkeProposalSpec,
    ProposalMismatch,
    esp_proposals,
    ike_proposals,
    proposal_text,
)
from oe_router.ike.service import IkeService, IkeUpError
from oe_router.ike.status_view import mismatch_rows
from oe_router.ike.tasks.ike_auth import IkeAuthResponder
from tests.ike_loop import linked, run_async
from tests.ike_pair import configs, establish, events, handshake, host_ts, shuttle

#: our defaults as keywords: what a refused peer is told we accept
DEFAULT_IKE_WORDS = (
    "aes256gcm16-prfsha256-curve25519-ecp256-modp2048",
    "chacha20poly1305-prfsha256-curve25519-ecp256-modp2048",
    "aes128gcm16-prfsha256-curve25519-ecp256-modp2048",
    "aes256-sha256-prfsha256-curve25519-ecp256-modp2048",
    "aes256-sha512-prfsha512-curve25519-ecp256-modp2048",
)
#: an IKE offer none of our defaults accepts (AES-CBC-128 for IKE)
CBC128 = IkeProposalSpec(
    EncrId.AES_CBC, 128, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, (DhId.ECP_256,)
)
SHA384_ONLY = (ESP_KEYWORDS["aes128-sha384"],)
GCM_ONLY = (ESP_KEYWORDS["aes256gcm16"],)


# --------------------------------------------------------------------------- keywords


def test_proposals_read_as_strongswan_keywords() -> None:
    assert tuple(proposal_text(p) for p in ike_proposals(DEFAULT_IKE_PROPOSALS)) == (
        DEFAULT_IKE_WORDS
    )
    esp = [proposal_text(p) for p in esp_proposals(DEFAULT_ESP_PROPOSALS, b"\x00\x00\x01\x00")]
    assert esp[:4] == [
        "aes256gcm16-noesn-esn",
        "aes128gcm16-noesn-esn",
        "chacha20poly1305-noesn-esn",
        "aes256-sha256-noesn-esn",
    ]
    no_esn = EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256)
    (p,) = esp_proposals((no_esn,), b"\x00\x00\x01\x00", (DhId.ECP_256,))
    assert proposal_text(p) == "aes256-sha512-ecp256-noesn"
    # transforms we have no keyword for keep their number, so nothing is hidden
    odd = Proposal(1, 3, b"\x00\x00\x01\x00", [Transform.make(1, 99), Transform.make(3, 77)])
    assert proposal_text(odd) == "encr99-integ77"


def test_a_flood_of_proposals_is_told_in_part() -> None:
    many = ike_proposals((CBC128,) * (MAX_TOLD + 5))
    m = ProposalMismatch.we_refused("IKE", many, ike_proposals(DEFAULT_IKE_PROPOSALS))
    assert m.theirs is not None and len(m.theirs) == MAX_TOLD + 1
    assert m.theirs[-1] == "(and 5 more)"


# --------------------------------------------------------------------------- the pair


def test_ike_sa_init_refused_both_sides_say_what_was_offered() -> None:
    """Initiator: the peer refused ours, its own unknown. Responder: what the initiator
    offered and what we accept."""
    ci, cr = configs()
    ci = dataclasses.replace(ci, ike_proposals=(CBC128,))
    _ini, _res, ie, re = handshake(ci, cr)
    (fi,) = ie
    (fr,) = re
    assert isinstance(fi, IkeSaFailed) and isinstance(fr, IkeSaFailed)
    assert fi.notify == fr.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert fi.reason == "peer refused IKE_SA_INIT: NO_PROPOSAL_CHOSEN"
    assert fi.offers == ProposalMismatch("IKE", "peer", ("aes128-sha256-prfsha256-ecp256",))
    assert "no acceptable IKE proposal" in fr.reason
    assert fr.offers == ProposalMismatch(
        "IKE", "us", DEFAULT_IKE_WORDS, ("aes128-sha256-prfsha256-ecp256",)
    )


def test_esp_refused_in_ike_auth_both_sides_say_what_was_offered() -> None:
    ci, cr = configs()
    ci = dataclasses.replace(ci, esp_proposals=SHA384_ONLY)
    cr = dataclasses.replace(cr, esp_proposals=GCM_ONLY)
    _ini, _res, ie, re = handshake(ci, cr)
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaFailed], ie
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaFailed], re
    fi, fr = ie[1], re[1]
    assert isinstance(fi, ChildSaFailed) and isinstance(fr, ChildSaFailed)
    assert fi.reason == "peer refused the Child SA"
    assert fi.offers == ProposalMismatch("ESP", "peer", ("aes128-sha384-noesn-esn",))
    assert fr.reason == "no acceptable ESP proposal"
    assert fr.offers == ProposalMismatch(
        "ESP", "us", ("aes256gcm16-noesn-esn",), ("aes128-sha384-noesn-esn",)
    )


def test_ike_auth_refused_whole_with_no_proposal_chosen_tells_our_esp_offer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenIKED refuses the whole IKE_AUTH when no ESP proposal matches: the IKE SA
    fails ("notify 14", as the QEMU test greps) and says what ESP we offered."""

    def refuse(self: IkeAuthResponder, msg: Any, now: float) -> None:
        self.sa.respond(msg, [Notify.status(NotifyType.NO_PROPOSAL_CHOSEN)])
        self.sa.fail("refused the Child SA's proposals", NotifyType.NO_PROPOSAL_CHOSEN)

    monkeypatch.setattr(IkeAuthResponder, "process", refuse)
    ci, cr = configs()
    ci = dataclasses.replace(ci, esp_proposals=SHA384_ONLY)
    _ini, _res, ie, _re = handshake(ci, cr)
    (fi,) = ie
    assert isinstance(fi, IkeSaFailed)
    assert fi.reason == "peer refused IKE_AUTH with notify 14"
    assert fi.offers == ProposalMismatch("ESP", "peer", ("aes128-sha384-noesn-esn",))


def test_create_child_sa_refused_both_sides_say_what_was_offered() -> None:
    """After NO_PROPOSAL_CHOSEN our initiator asks once more without PFS; the offer it
    reports is that last one (no DH groups), the responder's the request it refused."""
    ini, res, _ic, _rc = establish(*configs())
    ini.config = dataclasses.replace(ini.config, esp_proposals=SHA384_ONLY)
    res.config = dataclasses.replace(res.config, esp_proposals=GCM_ONLY)
    rid = ini.create_child((host_ts("192.0.2.1"),), (host_ts("198.51.100.7"),), False, 5.0)
    shuttle(ini, res, 5.0)
    (fi,) = events(ini)
    assert isinstance(fi, ChildSaFailed) and fi.request_id == rid
    assert fi.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert fi.offers == ProposalMismatch("ESP", "peer", ("aes128-sha384-noesn-esn",))
    refusals = events(res)
    assert [type(e) for e in refusals] == [ChildSaFailed, ChildSaFailed], refusals
    with_pfs, without = refusals
    assert isinstance(with_pfs, ChildSaFailed) and isinstance(without, ChildSaFailed)
    assert with_pfs.offers is not None and with_pfs.offers.theirs == (
        "aes128-sha384-curve25519-ecp256-modp2048-noesn-esn",
    )
    assert without.offers == ProposalMismatch(
        "ESP", "us", ("aes256gcm16-noesn-esn",), ("aes128-sha384-noesn-esn",)
    )
    assert "no acceptable ESP proposal" in without.reason


def test_other_refusals_carry_no_offers() -> None:
    """Only NO_PROPOSAL_CHOSEN says what was offered: a refused identity does not."""
    ci, cr = configs()
    cr = dataclasses.replace(cr, peer_public_key=Ed25519PrivateKey.generate().public_key())
    _ini, _res, ie, re = handshake(ci, cr)
    failed = [e for e in ie + re if isinstance(e, IkeSaFailed)]
    assert failed and all(e.offers is None for e in failed), (ie, re)


# --------------------------------------------------------------------------- the service


def _responder_handle(cfg: Any) -> Any:
    sa = SimpleNamespace(config=cfg, is_initiator=False, state="init-done")
    return SimpleNamespace(owner=None, sa=sa, remote=("203.0.113.9", 500))


def test_the_service_logs_and_keeps_the_latest_mismatch_per_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    table = PeerTable(RecordingSink(), lambda: now[0], lambda h: None)
    caplog.set_level(logging.INFO, logger="oe_router.ike")
    offers = ProposalMismatch("IKE", "us", DEFAULT_IKE_WORDS[:1], ("aes128-sha1-prfsha1-modp1024",))
    reason = "refused IKE_SA_INIT from 203.0.113.9: no acceptable IKE proposal"
    cfg = configs()[1]
    table.on_event(_responder_handle(cfg), IkeSaFailed(reason, 14, offers=offers))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"IKE SA with 203.0.113.9 failed: {reason} (the peer offered IKE"
        " aes128-sha1-prfsha1-modp1024; we accept aes256gcm16-prfsha256-curve25519-ecp256-modp2048)"
    )
    now[0] = 103.5
    (row,) = mismatch_rows(table.mismatches.values(), now[0])
    assert row == {
        "peer": "203.0.113.9",
        "age_s": 3.5,
        "protocol": "IKE",
        "refused_by": "us",
        "ours": [DEFAULT_IKE_WORDS[0]],
        "theirs": ["aes128-sha1-prfsha1-modp1024"],
    }
    # bounded: a flood of refused peers keeps the latest few
    for i in range(MISMATCHES_KEPT + 10):
        table.mismatch(f"192.0.2.{i}", offers, 200.0 + i)
    rows = mismatch_rows(table.mismatches.values(), 300.0)
    assert len(rows) == MISMATCHES_KEPT
    assert rows[0]["peer"] == f"192.0.2.{MISMATCHES_KEPT + 9}"


# --------------------------------------------------------------------------- status


def _daemon() -> DaemonStatus:
    return DaemonStatus("0.1.0", 42, 5.0, "/etc/config/oe", 1, True, "kernel")


PEER_REFUSED = ProposalOffers("ESP", "peer", ("aes256gcm16-noesn-esn", "aes256-sha512-noesn-esn"))
WE_REFUSED = {
    "peer": "203.0.113.9",
    "age_s": 3.5,
    "protocol": "IKE",
    "refused_by": "us",
    "ours": ["aes256gcm16-prfsha256-curve25519-ecp256-modp2048"],
    "theirs": ["aes128-sha1-prfsha1-modp1024"],
}


def test_status_json_round_trips_offers_and_stays_readable_without_them() -> None:
    shunt = ShuntStatus("192.0.2.10/32", "pass", "private-or-clear: x", 60.0, PEER_REFUSED)
    part = StatusContribution(shunts=(shunt,), ike={"proposal_mismatches": [WE_REFUSED]})
    status = Status.merge(_daemon(), [part])
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["shunts"][0]["offers"] == {
        "protocol": "ESP",
        "refused_by": "peer",
        "ours": ["aes256gcm16-noesn-esn", "aes256-sha512-noesn-esn"],
        "theirs": None,
    }
    # the keys that were there before stay, with their old meaning
    assert set(doc["shunts"][0]) == {"destination", "kind", "reason", "expires_s", "offers"}
    assert Status.from_json(doc) == status
    old = json.loads(json.dumps(doc))
    del old["shunts"][0]["offers"]
    assert Status.from_json(old).shunts[0].offers is None


def test_oe_status_text_shows_both_sides_offers() -> None:
    shunt = ShuntStatus("192.0.2.10/32", "pass", "private-or-clear: x", 60.0, PEER_REFUSED)
    part = StatusContribution(shunts=(shunt,), ike={"proposal_mismatches": [WE_REFUSED]})
    text = render_status(Status.merge(_daemon(), [part]))
    assert (
        "proposal mismatches (1)\n"
        "  203.0.113.9  IKE refused by us, 4s ago\n"
        "    peer offered IKE aes128-sha1-prfsha1-modp1024\n"
        "    we accept    IKE aes256gcm16-prfsha256-curve25519-ecp256-modp2048\n"
    ) in text
    assert (
        "  192.0.2.10/32:\n"
        "    we offered   ESP aes256gcm16-noesn-esn, aes256-sha512-noesn-esn\n"
        "    peer offered (not known: the peer only said NO_PROPOSAL_CHOSEN)"
    ) in text


@run_async
async def test_two_services_on_loopback_both_show_the_esp_mismatch() -> None:
    """``up`` fails saying what we offered; each side's ``oe status`` "ike" object lists
    the mismatch from its side (the responder's: what the initiator offered)."""
    a = IkeService(["127.0.0.1"], ike_port=0, natt_port=0, esp_proposals=SHA384_ONLY)
    b = IkeService(["127.0.0.1"], ike_port=0, natt_port=0, esp_proposals=GCM_ONLY)
    async with linked(a, b):
        with pytest.raises(IkeUpError) as err:
            await a.up("127.0.0.1")
        assert err.value.offers == ProposalMismatch("ESP", "peer", ("aes128-sha384-noesn-esn",))
        assert "IKE SA up but the Child SA failed: peer refused the Child SA" in str(err.value)
        (ours,) = a.status().ike["proposal_mismatches"]
        assert (ours["peer"], ours["refused_by"], ours["ours"], ours["theirs"]) == (
            "127.0.0.1",
            "peer",
            ["aes128-sha384-noesn-esn"],
            None,
        )
        (theirs,) = b.status().ike["proposal_mismatches"]
        assert (theirs["refused_by"], theirs["ours"], theirs["theirs"]) == (
            "us",
            ["aes256gcm16-noesn-esn"],
            ["aes128-sha384-noesn-esn"],
        )
