"""``list esp_proposal`` and the HMAC-SHA2-384/512 ESP transforms, against real charon.

Issue 15: setting ``esp_proposal`` changed nothing on the wire, and OpenIKED's default
Child SA offer (AES-CBC with HMAC-SHA2-512/384, no ESN) found no overlap with ours. Here
our daemon (``datapath userspace``: this host's kernel has no ESP) initiates to charon
(kernel-libipsec), and charon's own log says which ESP proposals it received, in our
order: the UCI order with ``offload off`` and with ``offload auto``. Then charon offers
only ``aes256-sha512-noesn`` (or ``aes128-sha384-noesn``), as OpenIKED would, and the
daemon's default offer must meet it: the tunnel comes up on that transform and a LAN
client's echoes cross it. Last, charon takes only ``aes128-sha1``: the proposal mismatch,
both ways, is in ``oe status`` and the log (issue 15 item 4).

    client (192.168.78.100) -- lan -- router: oe-routerd (wan 198.51.100.1)
                                          -- wan -- peer: charon (198.51.100.2)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from .charon import pubkey_conn
from .charon_lab import CharonLab, charon_lab

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("need_charon")]

WAN_R, WAN_P = "198.51.100.1", "198.51.100.2"
LAN_R, CLIENT = "192.168.78.1", "192.168.78.100"
IKE = "aes256gcm16-prfsha256-ecp256-x25519"
#: charon takes every ESP transform we may offer (our order is what the test reads)
CHARON_ESP = (
    "aes256gcm16, aes128gcm16, aes256-sha256, aes128-sha256, aes256-sha512, aes256-sha384, "
    "aes128-sha512, aes128-sha384"
)
#: our keywords -> how charon logs the ESP proposal (no ESN / ESN variants aside)
CHARON_NAMES = {
    "aes256gcm16": "ESP:AES_GCM_16_256",
    "aes256-sha256": "ESP:AES_CBC_256/HMAC_SHA2_256_128",
    "aes256-sha512": "ESP:AES_CBC_256/HMAC_SHA2_512_256",
    "aes128-sha384": "ESP:AES_CBC_128/HMAC_SHA2_384_192",
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CharonLab]:
    work = tmp_path_factory.mktemp("espprop")
    with charon_lab(work, "e", (WAN_R, WAN_P), (LAN_R, CLIENT), IKE, CHARON_ESP) as lab:
        yield lab


def _last_received(lab: CharonLab) -> list[str]:
    got = lab.charon.esp_proposals_received()
    assert got, lab.charon.log()[-3000:]
    return got[-1]


@pytest.mark.parametrize("offload", ["off", "auto"])
def test_charon_receives_the_uci_order_first(lab: CharonLab, offload: str) -> None:
    """esp_proposal 'aes256-sha512' 'aes256-sha256' 'aes256gcm16': the SA payload charon
    received in IKE_AUTH holds exactly these, in this order, with ``offload off`` and with
    ``offload auto`` (which reorders only the default list)."""
    explicit = ("aes256-sha512", "aes256-sha256", "aes256gcm16")
    lab.reconnect(CHARON_ESP, lab.config(offload, explicit))
    got = _last_received(lab)
    assert [p.split("/NO_EXT_SEQ")[0] for p in got] == [CHARON_NAMES[e] for e in explicit], got
    assert lab.daemon.status()["daemon"]["datapath"].startswith("userspace-esp")


@pytest.mark.parametrize(
    ("charon_esp", "ours", "integ"),
    [
        ("aes256-sha512-noesn", "aes256-sha512", "HMAC_SHA2_512_256"),
        ("aes128-sha384-noesn", "aes128-sha384", "HMAC_SHA2_384_192"),
    ],
)
def test_default_offer_meets_a_sha2_384_512_only_peer(
    lab: CharonLab, charon_esp: str, ours: str, integ: str
) -> None:
    """charon accepts only one HMAC-SHA2-384/512 transform without ESN (OpenIKED's kind of
    default): our default offer (no esp_proposal) holds it after the SHA-256 ones, the
    Child SA comes up on it, and 5 echoes from the LAN client cross it both ways."""
    lab.reconnect(charon_esp, lab.config("off"))
    got = _last_received(lab)
    names = [p.split("/NO_EXT_SEQ")[0] for p in got]
    assert names[0] == CHARON_NAMES["aes256gcm16"] and CHARON_NAMES[ours] in names, got
    assert names.index(CHARON_NAMES[ours]) > names.index(CHARON_NAMES["aes256-sha256"]), got
    raw = lab.charon.list_sas(raw=True)
    child = raw[raw.rfind("child-sas") :]
    assert f"integ-alg={integ}" in child and "esn=1" not in child, child
    before = lab.daemon.tunnels()[0]
    assert lab.ping(5) == 5, lab.daemon.log()[-2000:]
    lab.daemon.wait_counted(before, 5)


def test_a_proposal_mismatch_shows_both_sides_offers_in_oe_status(lab: CharonLab) -> None:
    """charon takes only ``aes128-sha1`` (SHA-1 we never offer). Our ``oe up`` fails and
    ``oe status`` says what ESP we offered and that charon's choice is not known; then
    charon initiates and we refuse its proposal: ``oe status`` names it (charon's
    ``aes128-sha1-noesn``) and what we accept. Each refusal's log line says the same."""
    d, peer = lab.daemon, lab.wan[1]
    d.oe("down", peer, check=False)
    d.wait_for("tunnel gone", lambda: not d.tunnels(), 15)
    lab.charon.conns = pubkey_conn(peer, lab.wan[0], lab.ike, "aes128-sha1")
    lab.charon._write()
    lab.charon.swanctl("--load-all", "--file", str(lab.charon.workdir / "swanctl/swanctl.conf"))
    p = d.oe("up", peer, "--auth", "pubkey", "--peer-key", str(lab.workdir / "charon.pem"),
             check=False)  # fmt: skip
    assert p.returncode != 0, p.stdout + p.stderr

    def mismatch(side: str) -> dict[str, Any] | None:
        rows = d.status()["ike"].get("proposal_mismatches", [])
        return next((r for r in rows if r["peer"] == peer and r["refused_by"] == side), None)

    ours = d.wait_for("our offer refused", lambda: mismatch("peer"), 15)
    assert ours["protocol"] == "ESP" and ours["theirs"] is None, ours
    assert ours["ours"] and not any("sha1" in o for o in ours["ours"]), ours
    assert "ESP:AES_CBC_128/HMAC_SHA1_96" not in str(lab.charon.esp_proposals_received()[-1])
    with contextlib.suppress(RuntimeError):  # charon's initiate fails: that is the point
        lab.charon.initiate("ours-c", timeout=10)
    theirs = d.wait_for("charon's offer refused", lambda: mismatch("us"), 15)
    assert theirs["protocol"] == "ESP", theirs
    assert theirs["theirs"] == ["aes128-sha1-noesn"], theirs
    assert theirs["ours"] == ours["ours"], (theirs, ours)
    text = d.oe("status").stdout
    assert "peer offered (not known: the peer only said NO_PROPOSAL_CHOSEN)" in text, text
    assert "    peer offered ESP aes128-sha1-noesn\n" in text, text
    log = d.log()
    assert f"we offered ESP {', '.join(ours['ours'])}; the peer did not say" in log, log[-3000:]
    assert "no acceptable ESP proposal (the peer offered ESP aes128-sha1-noesn; we accept" in log
