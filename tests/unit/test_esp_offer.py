"""The kernel datapath's ESP offer: gated by the end-to-end self-test, demotion, moves.

Why these tests: ``esp_offer.EspOffer`` decides what IKE may offer for kernel ESP. A
transform is offered only once an XFRM SA pair with it carried real ESP intact on the
driver the kernel picks now (``datapath.selftest``), preferred first and each as soon as
it passed; a driver that fails (KAT, canary, self-test) is lowered with ``offload_demote``
and its transform comes back once it passes again; live IKE SAs get every new offer and
Child SAs on a withdrawn transform are rekeyed onto it. The self-test bench, the kernel's
picks and NETLINK_CRYPTO are seams here: the QEMU test runs the real ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import dns.name
import pytest

import oe_router.esp_offer as D
from oe_router.config import OeConfig
from oe_router.config.schema import DEFAULT_ESP_PROPOSALS, PolicyConfig, parse_policy_entry
from oe_router.datapath.base import (
    ChildSaSpec,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.selftest import SelfTestGate, SelfTestResult, demotion_targets
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.ike.proposals import esp_offer
from oe_router.ike.sa import IkeSaConfig
from oe_router.ike.service import IkeService
from oe_router.oe.service import OeService
from oe_router.offload.chooser import ChoiceTable
from oe_router.offload.crypto_user import CryptoUserError
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.service import OffloadUpdate
from tests.aio import running
from tests.fake_datapath import FakeDatapath, FakeNegotiator

WAN = ipaddress.IPv4Address("198.51.100.1")
PEER = ipaddress.IPv4Address("192.0.2.7")
GCM_PICK = "rfc4106-gcm-aesni"
#: the default offer's AES-CBC + HMAC-SHA2 entries, in order (after the AEADs)
CBC_DEFAULTS = tuple(n for n in DEFAULT_ESP_PROPOSALS if "-sha" in n)
FAULTY = "rfc4106-gcm-aes-faulty"
PICKS: dict[str, str | None] = {
    "aes256gcm16": GCM_PICK,
    "aes128gcm16": GCM_PICK,
    "chacha20poly1305": "rfc7539esp(chacha20-simd,poly1305-simd)",
    "aes256-sha256": "authenc(hmac(sha256-generic),cbc-aes-aesni)",
    "aes128-sha256": "authenc(hmac(sha256-generic),cbc-aes-aesni)",
    "aes256-sha512": "authenc(hmac(sha512-generic),cbc-aes-aesni)",
    "aes256-sha384": "authenc(hmac(sha384-generic),cbc-aes-aesni)",
    "aes128-sha512": "authenc(hmac(sha512-generic),cbc-aes-aesni)",
    "aes128-sha384": "authenc(hmac(sha384-generic),cbc-aes-aesni)",
}


# --- the gate (pure) ------------------------------------------------------------------------
def _result(t: str, ok: bool = True, driver: str | None = None, **kw: Any) -> SelfTestResult:
    detail = "tunnel: 12+12 datagrams intact" if ok else "tunnel: A->B: 0 of 12 datagrams arrived"
    return SelfTestResult(t, ok, 48, 48 if ok else 24, 0, detail, driver or PICKS[t], 0.5, **kw)


def test_gate_tests_the_preferred_first_and_allows_only_what_passed() -> None:
    g = SelfTestGate()
    g.want(["chacha20poly1305", "aes256gcm16", "aes256-sha1"])
    assert g.busy and not g.allows("chacha20poly1305")
    assert g.allows("aes256-sha1")  # no self-test for it (no such transform): its KAT verdict alone
    assert g.next_batch() == ("chacha20poly1305", "aes256gcm16")
    assert g.next_batch() == ()  # running
    g.finished(_result("chacha20poly1305"), 1.0)
    g.finished(_result("aes256gcm16", ok=False), 1.5)
    assert g.allows("chacha20poly1305") and not g.allows("aes256gcm16")
    assert list(g.failed()) == ["aes256gcm16"] and not g.busy
    rows = {r.transform: r.state for r in g.rows()}
    assert rows == {
        "chacha20poly1305": "passed",
        "aes256gcm16": "failed",
        "aes256-sha1": "untestable",
    }


def test_gate_a_moved_pick_makes_a_result_stale_until_tested_again() -> None:
    g = SelfTestGate()
    g.want(["aes256gcm16"])
    g.next_batch()
    g.finished(_result("aes256gcm16"), 1.0)
    assert g.picks({"aes256gcm16": GCM_PICK}) == ()
    assert g.picks({"aes256gcm16": FAULTY}) == ("aes256gcm16",)
    assert not g.allows("aes256gcm16")  # tested on another driver than today's pick
    (row,) = g.rows()
    assert row.stale and f"from {GCM_PICK} to {FAULTY}" in row.note
    assert g.next_batch() == ("aes256gcm16",)
    g.picks({"aes256gcm16": GCM_PICK})  # moved again while it runs: compared after
    g.finished(_result("aes256gcm16", driver=FAULTY), 2.0)
    assert g.allows("aes256gcm16") and not g.busy
    assert g.picks({"aes256gcm16": GCM_PICK}) == ("aes256gcm16",)


def test_gate_invalidated_while_running_stays_stale_and_runs_again() -> None:
    g = SelfTestGate()
    g.want(["aes256gcm16"])
    g.next_batch()
    g.finished(_result("aes256gcm16"), 1.0)
    g.invalidate(["aes256gcm16"], "x's priority was lowered")
    assert g.next_batch() == ("aes256gcm16",)
    g.invalidate(["aes256gcm16"], "again")
    g.finished(_result("aes256gcm16"), 2.0)
    assert not g.allows("aes256gcm16") and g.next_batch() == ("aes256gcm16",)


def test_gate_inconclusive_is_offered_and_interrupted_runs_again() -> None:
    g = SelfTestGate()
    g.want(["aes256gcm16", "aes128gcm16"])
    g.next_batch()
    why = "could not build the test namespaces and veth pair: needs veth"
    g.finished(SelfTestResult("aes256gcm16", False, 0, 0, 0, why, inconclusive=True), 1.0)
    g.interrupted(["aes256gcm16", "aes128gcm16"])
    assert g.allows("aes256gcm16") and g.failed() == {}
    assert g.next_batch() == ("aes128gcm16",)


def test_demotion_targets_name_the_drivers_inside_an_instance() -> None:
    assert demotion_targets(FAULTY) == (FAULTY,)
    assert demotion_targets("authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)") == (
        "virtio_crypto_aes_cbc",
        "sha256-generic",
    )
    assert demotion_targets("") == ()


# --- EspOffer ----------------------------------------------------------------------------------
class FakeOffload:
    def __init__(self) -> None:
        self.subscribers: list[Callable[[OffloadUpdate], None]] = []
        self.report_extras: list[Any] = []
        self.rescans = 0

    def subscribe(self, cb: Callable[[OffloadUpdate], None]) -> Callable[[], None]:
        self.subscribers.append(cb)
        return lambda: None

    def rescan(self) -> None:
        self.rescans += 1

    def publish(self, update: OffloadUpdate) -> None:
        for cb in self.subscribers:
            cb(update)


def _update(
    failed: Sequence[tuple[str, str]] = (), picks: dict[str, str | None] | None = None
) -> OffloadUpdate:
    drivers = picks if picks is not None else PICKS
    bad = {t for t, _ in failed}
    return OffloadUpdate(
        table=ChoiceTable(),
        proposal=DEFAULT_ESP_PROPOSALS,
        kernel_usable=frozenset(t for t in TRANSFORMS if t not in bad),
        kernel_checked=True,
        kernel_proposal=DEFAULT_ESP_PROPOSALS,
        kernel_failed=tuple(failed),
        kernel_drivers=tuple(sorted((t, d) for t, d in drivers.items() if d)),
    )


class Bench:
    """The self-test runner seam: scripted verdicts, what the offer was after each."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []
        self.fail: dict[str, str | None] = {}  # transform -> driver it fails on
        self.inconclusive = False
        self.gate: asyncio.Event | None = None
        self.offers: list[tuple[str, ...]] = []
        self.offer: D.EspOffer | None = None
        self.picks = dict(PICKS)

    async def __call__(
        self, transforms: Sequence[str], on_result: Callable[[SelfTestResult], None]
    ) -> None:
        self.batches.append(tuple(transforms))
        for t in transforms:
            if self.gate is not None:
                await self.gate.wait()
            if self.inconclusive:
                why = "could not build the test namespaces and veth pair: no veth"
                on_result(SelfTestResult(t, False, 0, 0, 0, why, inconclusive=True))
            else:
                bad = t in self.fail
                if bad:  # the self-test ran on the kernel's pick: that is the failing driver
                    self.picks[t] = self.fail[t]
                on_result(_result(t, ok=not bad, driver=self.picks[t]))
            assert self.offer is not None
            self.offers.append(self.offer.offer)
            await asyncio.sleep(0)


class Harness:
    def __init__(self, config: OeConfig | None = None) -> None:
        self.ike = IkeService([str(WAN)])
        self.offload = FakeOffload()
        self.bench = Bench()
        self.demoted: list[str] = []
        self.demote_error: Exception | None = None
        self.changes = 0
        self.config = config or OeConfig()
        self.offer = D.EspOffer(
            self.ike,
            self.offload,  # type: ignore[arg-type]
            "kernel",
            run_selftests=self.bench,
            read_picks=lambda: dict(self.bench.picks),
            demote=self._demote,
            pick_interval=3600,
        )
        self.bench.offer = self.offer
        self.offer.listeners.append(self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def _demote(self, driver: str) -> tuple[int, int]:
        self.demoted.append(driver)
        if self.demote_error is not None:
            raise self.demote_error
        return 500, 399

    async def start(self) -> None:
        await self.offer.start(self.config)
        self.offload.publish(_update())

    async def settle(self) -> None:
        """Until the self-test loop is idle and no pick check runs."""
        for _ in range(200):
            await asyncio.sleep(0.005)
            gate, runner = self.offer.gate, self.offer.selftest
            assert gate is not None and runner is not None
            if not gate.busy and runner.idle:
                await asyncio.sleep(0.01)
                if not gate.busy:
                    return
        raise AssertionError("the self-test loop did not settle")


def _spec(name: str, spi: int = 0x100) -> ChildSaSpec:
    host = (TrafficSelector(ipaddress.ip_network(WAN)),)
    peer = (TrafficSelector(ipaddress.ip_network(PEER)),)
    if name == "aes256gcm16":
        a, b, encr, integ = SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), 20, None
    elif name == "aes128gcm16":
        a, b, encr, integ = SaKeys(spi, bytes(20)), SaKeys(spi + 1, bytes(20)), 20, None
    elif name == "chacha20poly1305":
        a, b, encr, integ = SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), 28, None
    else:
        a, b = SaKeys(spi, bytes(32), bytes(32)), SaKeys(spi + 1, bytes(32), bytes(32))
        encr, integ = 12, 12
    return ChildSaSpec(
        WAN, PEER, a, b, encr_algorithm(encr), integ_algorithm(integ) if integ else None,
        local_ts=host, remote_ts=peer,
    )  # fmt: skip


def test_esp_keyword_of_every_transform() -> None:
    for name in ("aes256gcm16", "aes128gcm16", "chacha20poly1305", "aes256-sha256"):
        assert D.esp_keyword(_spec(name)) == name
    assert D.esp_keyword(object()) is None


def test_the_offer_starts_empty_and_grows_preferred_first() -> None:
    async def main() -> Harness:
        h = Harness()
        h.bench.gate = asyncio.Event()
        await h.start()
        assert h.offer.offer == () and h.ike.esp_proposals == ()
        assert await h.offer.wait_offer(0.05) == (
            "no ESP transform has passed the kernel datapath's self-test yet"
        )
        waiter = asyncio.create_task(h.offer.wait_offer(5.0))
        h.bench.gate.set()
        assert await waiter is None  # released by the first pass, not the timeout
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.bench.batches == [DEFAULT_ESP_PROPOSALS]  # one bench, the preferred first
    n = len(DEFAULT_ESP_PROPOSALS)
    assert h.bench.offers == [DEFAULT_ESP_PROPOSALS[: i + 1] for i in range(n)]
    assert h.offer.offer == DEFAULT_ESP_PROPOSALS
    assert h.ike.esp_proposals == esp_offer(DEFAULT_ESP_PROPOSALS)
    section = h.offer.report_extra()["kernel_selftest"]
    assert section["first_offer_s"] is not None and section["first_round_s"] is not None
    assert all(t["state"] == "passed" and t["offered"] for t in section["transforms"].values())
    row = h.offer.engine_row()
    assert row.name == "kernel-esp" and [t.kat for t in row.transforms] == ["passed"] * n
    assert h.offload.report_extras == [h.offer.report_extra]


def test_a_transform_that_fails_its_self_test_is_never_offered() -> None:
    async def main() -> Harness:
        h = Harness()
        h.bench.fail["aes128gcm16"] = FAULTY
        await h.start()
        await h.settle()
        return h

    h = asyncio.run(main())
    assert "aes128gcm16" not in h.offer.offer
    assert len(h.offer.offer) == len(DEFAULT_ESP_PROPOSALS) - 1
    why = h.offer.why_not("aes128gcm16")
    assert f"its ESP self-test failed on {FAULTY}: tunnel: A->B: 0 of 12" in why
    assert f"offload_demote is off: {FAULTY} keeps its priority" in why
    assert h.demoted == []
    row = {t.transform: t for t in h.offer.engine_row().transforms}["aes128gcm16"]
    assert (row.kat, row.driver, row.in_use_for) == ("failed", FAULTY, "")
    assert h.offer.withdrawn(_spec("aes128gcm16")) == (
        f"aes128gcm16 was withdrawn: its ESP self-test failed on {FAULTY}"
    )
    assert h.offer.withdrawn(_spec("aes256gcm16")) is None


def test_an_unavailable_bench_leaves_the_known_answer_tests_in_charge() -> None:
    async def main() -> Harness:
        h = Harness()
        h.bench.inconclusive = True
        await h.start()
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.offer.offer == DEFAULT_ESP_PROPOSALS
    assert {t.kat for t in h.offer.engine_row().transforms} == {"inconclusive"}


def test_a_kat_failure_withdraws_live_child_sas_and_tells_listeners() -> None:
    async def main() -> Harness:
        h = Harness()
        await h.start()
        await h.settle()
        before = h.changes
        h.offload.publish(_update(failed=[("aes256gcm16", FAULTY), ("aes128gcm16", FAULTY)]))
        assert h.changes == before + 1
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.offer.offer == ("chacha20poly1305", *CBC_DEFAULTS)
    assert h.offer.withdrawn(_spec("aes256gcm16")) == (
        f"aes256gcm16 was withdrawn: the kernel's pick {FAULTY} failed its known-answer test"
    )
    assert h.offer.withdrawn(_spec("chacha20poly1305")) is None
    assert "offload_demote is off" in h.offer.why_not("aes256gcm16")


def test_a_moved_pick_is_tested_again_before_it_is_offered() -> None:
    async def main() -> tuple[Harness, tuple[str, ...]]:
        h = Harness()
        await h.start()
        await h.settle()
        h.bench.gate = asyncio.Event()
        h.bench.picks["aes256gcm16"] = h.bench.picks["aes128gcm16"] = FAULTY
        h.offload.publish(_update(picks=h.bench.picks))
        for _ in range(100):
            await asyncio.sleep(0.005)
            if len(h.bench.batches) == 2:
                break
        during = h.offer.offer
        h.bench.gate.set()
        await h.settle()
        return h, during

    h, during = asyncio.run(main())
    assert h.bench.batches[1] == ("aes256gcm16", "aes128gcm16")
    assert during == ("chacha20poly1305", *CBC_DEFAULTS)
    assert h.offer.offer == DEFAULT_ESP_PROPOSALS
    rows = {t.transform: t.driver for t in h.offer.engine_row().transforms}
    assert rows["aes256gcm16"] == FAULTY


def test_offload_demote_lowers_the_failing_pick_once_and_tests_again() -> None:
    async def main() -> Harness:
        h = Harness(replace(OeConfig(), offload_demote=True))
        await h.start()
        await h.settle()
        failed = [("aes256gcm16", FAULTY), ("aes128gcm16", FAULTY)]
        h.offload.publish(_update(failed=failed))
        await h.settle()
        assert h.demoted == [FAULTY] and h.offload.rescans == 1
        assert h.bench.batches[-1] == ("aes256gcm16", "aes128gcm16")  # tested again
        h.offload.publish(_update(failed=failed))  # the same failure: lowered already
        h.offload.publish(_update())  # the KATs passed on the new pick
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.demoted == [FAULTY]
    assert h.offer.offer == DEFAULT_ESP_PROPOSALS
    (d,) = h.offer.demotions
    assert (d["driver"], d["transform"], d["priority_before"], d["priority_after"]) == (
        FAULTY, "aes256gcm16", 500, 399,
    )  # fmt: skip


def test_offload_demote_walks_the_drivers_of_a_failing_instance() -> None:
    composed = "authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)"

    async def main() -> Harness:
        h = Harness(replace(OeConfig(), offload_demote=True))
        h.bench.fail["aes256-sha256"] = composed
        await h.start()
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.demoted == ["virtio_crypto_aes_cbc", "sha256-generic"]
    assert "aes256-sha256" not in h.offer.offer
    assert "offload_demote: lowered virtio_crypto_aes_cbc from priority 500 to 399" in (
        h.offer.why_not("aes256-sha256")
    )


def test_a_demotion_that_fails_is_said_and_retried_only_after_a_reload() -> None:
    async def main() -> Harness:
        h = Harness(replace(OeConfig(), offload_demote=True))
        h.demote_error = CryptoUserError("kernel has no NETLINK_CRYPTO: load crypto_user")
        await h.start()
        await h.settle()
        h.offload.publish(_update(failed=[("aes256gcm16", FAULTY)]))
        await h.settle()
        h.offload.publish(_update(failed=[("aes256gcm16", FAULTY)]))
        await h.settle()
        assert h.demoted == [FAULTY]
        assert f"could not lower {FAULTY}: kernel has no NETLINK_CRYPTO" in (
            h.offer.why_not("aes256gcm16")
        )
        h.demote_error = None
        await h.offer.reload(OeConfig())  # off: nothing
        await h.offer.reload(replace(OeConfig(), offload_demote=True))
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.demoted == [FAULTY, FAULTY]


def test_live_ike_sas_get_every_new_offer() -> None:
    async def main() -> Harness:
        h = Harness()
        cfg = IkeSaConfig((str(WAN), 500), (str(PEER), 500), (), ())
        h.ike.sas.append(SimpleNamespace(handle=SimpleNamespace(sa=SimpleNamespace(config=cfg))))  # type: ignore[arg-type]
        await h.start()
        await h.settle()
        h.offload.publish(_update(failed=[("aes256gcm16", FAULTY)]))
        return h

    h = asyncio.run(main())
    sa = h.ike.sas[0].handle.sa
    assert sa.config.esp_proposals == esp_offer(h.offer.offer)
    assert "aes256gcm16" not in h.offer.offer


def test_the_userspace_datapath_offer_has_no_self_test() -> None:
    offload = FakeOffload()
    offer = D.EspOffer(IkeService([str(WAN)]), offload, "userspace")  # type: ignore[arg-type]
    assert offer.gate is None and offload.report_extras == []
    offload.publish(_update())
    assert offer.offer == () and offer.withdrawn(_spec("aes256gcm16")) is None
    assert offer.empty_reason() is not None and offer.status().engines == ()


# --- rekey_child over the IKE service's view -----------------------------------------------
class FakeSa:
    """An IkeSa's Child SA states as ``rekey_child`` and ``child_sas`` show them."""

    def __init__(self, spi_in: bytes, script: list[str], error: bool = False) -> None:
        self.spi_in = spi_in
        self.script = script  # states after the rekey request, one per look
        self.state = "installed"
        self.requests = 0
        self.error = error
        self.config = IkeSaConfig((str(WAN), 500), (str(PEER), 500), (), ())

    def rekey_child(self, spi_in: bytes, now: float) -> None:
        from oe_router.ike.errors import IkeError

        if self.error:
            raise IkeError(f"no installed Child SA with inbound SPI {spi_in.hex()}")
        self.requests += 1
        self.state = "rekeying"

    def child_sas(self) -> list[Any]:
        if self.requests and self.script:
            self.state = self.script.pop(0)
        return (
            [] if self.state == "gone" else [SimpleNamespace(spi_in=self.spi_in, state=self.state)]
        )


def _rekey(sa: FakeSa, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setattr(D, "MOVE_SETTLE", 0.05)
    monkeypatch.setattr(D, "MOVE_TIMEOUT", 0.5)
    ike = IkeService([str(WAN)])
    flushed: list[object] = []
    ike.endpoint = SimpleNamespace(flush=flushed.append)  # type: ignore[assignment]
    handle = SimpleNamespace(sa=sa)
    p = SimpleNamespace(peer=str(PEER), handle=handle, children={sa.spi_in: object()})
    ike.sas.append(p)  # type: ignore[arg-type]
    offer = D.EspOffer(ike, FakeOffload(), "kernel")  # type: ignore[arg-type]
    spec = _spec("aes256gcm16", int.from_bytes(sa.spi_in, "big"))
    out = asyncio.run(offer.rekey_child(PEER, spec))
    assert flushed == ([handle] if not sa.error else [])
    (move,) = offer.moves  # for `oe offload --json`: when, how long, the outcome
    assert (move["peer"], move["transform"], move["error"]) == (str(PEER), "aes256gcm16", out)
    return out


def test_rekey_child_done_when_the_old_sa_is_on_its_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sa = FakeSa(b"\0\0\1\0", ["rekeying", "rekeying", "deleting"])
    assert _rekey(sa, monkeypatch) is None and sa.requests == 1


def test_rekey_child_refused_when_the_sa_stays_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    sa = FakeSa(b"\0\0\1\0", ["rekeying", "installed"])
    out = _rekey(sa, monkeypatch)
    assert out is not None and out.startswith("the peer took none of the current offer")


def test_rekey_child_that_cannot_start_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _rekey(FakeSa(b"\0\0\1\0", [], error=True), monkeypatch)
    assert out is not None and out.startswith("cannot rekey it: no installed Child SA")


def test_rekey_child_without_an_ike_sa_says_so() -> None:
    ike = IkeService([str(WAN)])
    ike.endpoint = SimpleNamespace(flush=lambda h: None)  # type: ignore[assignment]
    offer = D.EspOffer(ike, FakeOffload(), "kernel")  # type: ignore[arg-type]
    out = asyncio.run(offer.rekey_child(PEER, _spec("aes256gcm16")))
    assert out == f"no IKE SA with {PEER} carries this Child SA"


# --- the OE service's side: waiting for an offer, moving Child SAs -----------------------------
class FakeOffer:
    def __init__(self) -> None:
        self.empty: str | None = "no ESP transform has passed the kernel datapath's self-test yet"
        self.waits: list[float] = []
        self.gone: set[str] = set()
        self.rekeyed: list[ChildSaSpec] = []
        self.rekey_error: str | None = None

    def empty_reason(self) -> str | None:
        return self.empty

    async def wait_offer(self, timeout: float) -> str | None:
        self.waits.append(timeout)
        return self.empty

    def withdrawn(self, spec: ChildSaSpec) -> str | None:
        name = D.esp_keyword(spec)
        return f"{name} was withdrawn" if name in self.gone else None

    async def rekey_child(self, peer: object, spec: ChildSaSpec) -> str | None:
        self.rekeyed.append(spec)
        return self.rekey_error


def _oe(offer: FakeOffer) -> tuple[OeService, FakeDatapath, FakeNegotiator]:
    dp = FakeDatapath()
    neg = FakeNegotiator(_spec("aes256gcm16"))
    svc = OeService(datapath_factory=lambda c: dp, negotiator=neg, wan={4: WAN})  # type: ignore[arg-type,return-value]
    svc.offer = offer
    return svc, dp, neg


def _config() -> OeConfig:
    policy = PolicyConfig(private_or_clear=(parse_policy_entry("0.0.0.0/0"),))  # type: ignore[arg-type]
    return replace(OeConfig(), policy=policy)


KEY = PeerKey(KeyKind.NONE, None, 0, dns.name.from_text("h.test"), 0)


def test_negotiations_wait_for_an_offer_and_fail_with_why_when_none_comes() -> None:
    async def main() -> tuple[bool, FakeOffer, FakeNegotiator, OeService]:
        offer = FakeOffer()
        svc, _dp, neg = _oe(offer)
        async with running(svc, _config()):
            assert svc.refuses_peer(str(PEER)) == offer.empty  # inbound IKE: retransmit later
            ok = await svc.ensure_tunnel(dns.name.from_text("h.test"), (PEER,), KEY)
            shunts = svc.status().shunts
            assert shunts and offer.empty in shunts[0].reason  # type: ignore[operator]
        return ok, offer, neg, svc

    ok, offer, neg, _ = asyncio.run(main())
    assert not ok and offer.waits == [10.0] and neg.requests == []


def test_a_withdrawn_transform_moves_the_child_sa_through_the_ike_rekey() -> None:
    async def main() -> tuple[FakeOffer, list[str], FakeDatapath]:
        offer = FakeOffer()
        offer.empty = None
        svc, dp, _neg = _oe(offer)
        async with running(svc, _config()):
            assert await svc.ensure_tunnel(dns.name.from_text("h.test"), (PEER,), KEY)
            svc.offer_changed()  # nothing withdrawn: nothing moves
            await asyncio.sleep(0.02)
            assert offer.rekeyed == []
            offer.gone.add("aes256gcm16")
            svc.offer_changed()
            for _ in range(100):
                await asyncio.sleep(0.005)
                if offer.rekeyed:
                    break
            await asyncio.sleep(0.02)
            return offer, [t.state for t in svc.status().tunnels], dp

    offer, states, dp = asyncio.run(main())
    assert [D.esp_keyword(s) for s in offer.rekeyed] == ["aes256gcm16"]
    # the rekey was started; the new SA arrives through adopt_inbound and supersedes it
    assert states == ["established"] and dp.removed == []


def test_a_move_that_fails_renegotiates_with_the_new_offer() -> None:
    async def main() -> tuple[FakeOffer, FakeNegotiator, FakeDatapath]:
        offer = FakeOffer()
        offer.empty = None
        offer.rekey_error = "the peer took none of the current offer"
        svc, dp, neg = _oe(offer)
        async with running(svc, _config()):
            assert await svc.ensure_tunnel(dns.name.from_text("h.test"), (PEER,), KEY)
            neg.spec = _spec("chacha20poly1305", 0x200)
            offer.gone.add("aes256gcm16")
            svc.offer_changed()
            for _ in range(200):
                await asyncio.sleep(0.005)
                if len(neg.requests) == 2 and len(dp.installed) == 2:
                    break
            await asyncio.sleep(0.02)
        return offer, neg, dp

    offer, neg, dp = asyncio.run(main())
    assert len(offer.rekeyed) == 1 and len(neg.requests) == 2
    assert [D.esp_keyword(s) for s in dp.installed] == ["aes256gcm16", "chacha20poly1305"]
    assert D.esp_keyword(dp.removed[0]) == "aes256gcm16"


# --- esp_proposal from UCI x offload (issue 15) ----------------------------------------------
#: what ``offload auto`` ranks first on this made-up box: AES-128-CBC/SHA-256 is fastest
FAST_FIRST = ("aes128-sha256", "aes256gcm16", "aes128gcm16", "chacha20poly1305", "aes256-sha256",
              "aes256-sha512", "aes256-sha384", "aes128-sha512", "aes128-sha384")  # fmt: skip


def _userspace_update(failed: Sequence[str] = ()) -> OffloadUpdate:
    """The software engine proven for every transform but ``failed``; ``offload auto``'s
    ranking is FAST_FIRST."""
    from oe_router.offload.chooser import Verdict, choose

    verdicts = [Verdict("software", t, t not in failed) for t in TRANSFORMS]
    return OffloadUpdate(
        table=choose("off", ["software"], verdicts, []),
        proposal=tuple(t for t in FAST_FIRST if t not in failed),
        kernel_usable=frozenset(),
    )


def _cfg(offload: str, esp: tuple[str, ...] = ()) -> OeConfig:
    base = OeConfig()
    return replace(base, offload=offload, ike=replace(base.ike, esp_proposals=esp))


def _userspace_offer(config: OeConfig, failed: Sequence[str] = ()) -> tuple[D.EspOffer, IkeService]:
    ike, offload = IkeService([str(WAN)]), FakeOffload()
    offer = D.EspOffer(ike, offload, "userspace")  # type: ignore[arg-type]
    asyncio.run(offer.start(config))
    offload.publish(_userspace_update(failed))
    return offer, ike


def _first_on_the_wire(ike: IkeService) -> tuple[int, int | None, int | None]:
    """(encryption id, key bits, integrity id) of the first proposal of the SA payload a
    new IKE SA of this service sends (``ike/proposals.esp_proposals``)."""
    from oe_router.ike.constants import TransformType
    from oe_router.ike.proposals import esp_proposals

    first = esp_proposals(ike.esp_proposals, b"\x00\x00\x00\x01")[0]
    (encr,) = first.of_type(TransformType.ENCR)
    integ = first.of_type(TransformType.INTEG)
    return encr.transform_id, encr.key_length, integ[0].transform_id if integ else None


@pytest.mark.parametrize("offload", ["off", "auto"])
def test_an_explicit_esp_proposal_is_offered_in_its_uci_order(offload: str) -> None:
    """``offload off`` and ``auto`` alike: the UCI list, in its order, is the offer (auto
    never reorders an explicit list), and its first entry leads the SA payload."""
    explicit = ("aes256-sha512", "aes256-sha256", "aes256gcm16")
    offer, ike = _userspace_offer(_cfg(offload, explicit))
    assert offer.offer == explicit
    assert ike.esp_proposals == esp_offer(explicit)
    assert _first_on_the_wire(ike) == (12, 256, 14)  # ENCR_AES_CBC 256, AUTH_HMAC_SHA2_512_256


@pytest.mark.parametrize(
    ("offload", "first"), [("off", DEFAULT_ESP_PROPOSALS[0]), ("auto", FAST_FIRST[0])]
)
def test_the_default_offer_is_reordered_only_by_offload_auto(offload: str, first: str) -> None:
    offer, ike = _userspace_offer(_cfg(offload))
    assert offer.offer[0] == first and set(offer.offer) == set(DEFAULT_ESP_PROPOSALS)
    if offload == "off":
        assert offer.offer == DEFAULT_ESP_PROPOSALS
    assert ike.esp_proposals == esp_offer(offer.offer)


def test_an_explicit_entry_the_datapath_cannot_run_is_dropped_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", "oe_router.daemon")
    offer, _ = _userspace_offer(
        _cfg("off", ("aes256-sha384", "aes256-sha256")), failed=("aes256-sha384",)
    )
    assert offer.offer == ("aes256-sha256",)
    offer.apply()  # again: no second warning
    lines = [r.getMessage() for r in caplog.records if "esp_proposal" in r.getMessage()]
    assert len(lines) == 1 and "aes256-sha384" in lines[0] and "aes256-sha256" not in lines[0]
    assert "left out of the offer" in lines[0]
    assert "no crypto engine here passed" in offer.why_not("aes256-sha384")


def test_an_explicit_list_with_nothing_runnable_is_refused_at_reload() -> None:
    offer, _ = _userspace_offer(_cfg("off", ("aes256-sha256",)), failed=("aes256-sha384",))
    with pytest.raises(D.ServiceError, match=r"^esp_proposal: the userspace datapath cannot run "
                       r"aes256-sha384 \(.*\); nothing left to offer$"):  # fmt: skip
        asyncio.run(offer.reload(_cfg("off", ("aes256-sha384",))))
    assert offer.offer == ("aes256-sha256",)  # the old config still rules
    asyncio.run(offer.reload(_cfg("off", ("aes256-sha384", "aes128-sha512"))))
    assert offer.offer == ("aes128-sha512",)


def test_every_esp_proposal_keyword_is_a_transform_the_engines_know() -> None:
    """The schema accepts no keyword the IKE layer or the engines lack (the old
    ``aes256-sha512``: accepted, then silently never offered)."""
    from oe_router.config.schema import ESP_PROPOSALS
    from oe_router.ike.proposals import ESP_KEYWORDS

    assert set(ESP_PROPOSALS) == set(ESP_KEYWORDS) == set(TRANSFORMS)
    assert set(DEFAULT_ESP_PROPOSALS) <= set(ESP_PROPOSALS)
    assert DEFAULT_ESP_PROPOSALS[:3] == ("aes256gcm16", "aes128gcm16", "chacha20poly1305")
    for name, spec in ESP_KEYWORDS.items():
        t = TRANSFORMS[name]
        assert (spec.encr, spec.key_bits, spec.integ) == (
            t.ike_encr, None if t.ike_encr == 28 else t.cipher_key_len * 8, t.ike_integ
        )  # fmt: skip


@pytest.mark.parametrize("offload", ["off", "auto"])
def test_the_kernel_datapath_offers_an_explicit_list_in_its_order(offload: str) -> None:
    """Kernel ESP: the explicit list, self-tested, in the UCI order, though the kernel's
    pick ranks another transform first (``kernel_proposal``)."""
    explicit = ("aes128-sha384", "aes256gcm16", "aes256-sha512")

    async def main() -> Harness:
        h = Harness(_cfg(offload, explicit))
        await h.offer.start(h.config)
        h.offload.publish(replace(_update(), kernel_proposal=FAST_FIRST))
        await h.settle()
        return h

    h = asyncio.run(main())
    assert h.bench.batches == [explicit]  # only what is listed is self-tested, in order
    assert h.offer.offer == explicit
    assert h.ike.esp_proposals == esp_offer(explicit)


def test_without_a_datapath_ike_still_offers_the_configured_list() -> None:
    """No ESP anywhere (SAs negotiated, not installed): the daemon's IKE service offers
    the esp_proposal list, not its built-in one, and follows a reload."""
    from oe_router.daemon import build_services
    from oe_router.platform import Platform

    plat = Platform(wan={4: WAN}, datapath="none", datapath_reason="the kernel lacks ESP")
    registry = build_services(_cfg("off", ("aes128-sha384", "aes256gcm16")), platform=plat)
    assert registry.names[1:4] == ("oe", "esp-offer", "ike")  # the offer before IKE starts
    offer, ike = [s for s in registry if s.name in ("esp-offer", "ike")]
    assert isinstance(ike, IkeService)
    asyncio.run(offer.start(_cfg("off", ("aes128-sha384", "aes256gcm16"))))
    assert ike.esp_proposals == esp_offer(("aes128-sha384", "aes256gcm16"))
    asyncio.run(offer.reload(_cfg("off")))
    assert ike.esp_proposals == esp_offer(DEFAULT_ESP_PROPOSALS)
