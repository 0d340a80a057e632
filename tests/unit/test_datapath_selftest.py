"""The ESP self-test's pure parts: transform mapping, plans, frame classification, verdicts,
and the asyncio edge's deadline and cancellation (with the blocking worker replaced).

The part that needs a kernel with ESP (namespaces, veth, SAs, traffic) runs in the QEMU
lab: tests/qemu/test_kernel_esp_selftest.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from oe_router.datapath import selftest as S
from oe_router.datapath.base import (
    ChildSaCounters,
    DatapathError,
    Mode,
    NatTEncap,
    SaCounters,
)
from oe_router.offload.engine import TRANSFORMS


def counting_rng() -> Callable[[int], bytes]:
    """Deterministic 'random' bytes: a running counter, so every draw differs."""
    counter = itertools.count(1)

    def rng(n: int) -> bytes:
        return bytes(next(counter) & 0xFF for _ in range(n))

    return rng


# --- transform mapping --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kernel", "integ", "key_bytes"),
    [
        ("aes128gcm16", "rfc4106(gcm(aes))", None, 20),
        ("aes256gcm16", "rfc4106(gcm(aes))", None, 36),
        ("chacha20poly1305", "rfc7539esp(chacha20,poly1305)", None, 36),
        ("aes128-sha256", "cbc(aes)", "hmac(sha256)", 16),
        ("aes256-sha256", "cbc(aes)", "hmac(sha256)", 32),
        ("aes128-sha384", "cbc(aes)", "hmac(sha384)", 16),
        ("aes256-sha384", "cbc(aes)", "hmac(sha384)", 32),
        ("aes128-sha512", "cbc(aes)", "hmac(sha512)", 16),
        ("aes256-sha512", "cbc(aes)", "hmac(sha512)", 32),
    ],
)
def test_every_transform_maps_to_the_kernel_datapath(
    name: str, kernel: str, integ: str | None, key_bytes: int
) -> None:
    encr, ia = S.xfrm_algorithms(TRANSFORMS[name])
    assert encr.kernel_name == kernel
    assert (ia.kernel_name if ia else None) == integ
    if ia is not None:
        # RFC 4868: half the hash (128/192/256), never the 96-bit XFRMA_ALG_AUTH default
        assert ia.trunc_bits == {"hmac(sha256)": 128, "hmac(sha384)": 192}.get(integ, 256)
        assert ia.key_bits == 8 * TRANSFORMS[name].auth_key_len
    plan = S.plan_selftest(name, rng=counting_rng())
    assert len(plan.spec_a.inbound.encr_key) == key_bytes


def test_every_transform_is_covered() -> None:
    assert set(TRANSFORMS) == {
        "aes128gcm16",
        "aes256gcm16",
        "chacha20poly1305",
        "aes128-sha256",
        "aes256-sha256",
        "aes128-sha384",
        "aes256-sha384",
        "aes128-sha512",
        "aes256-sha512",
    }


def test_a_transform_whose_sizes_disagree_is_refused() -> None:
    odd = replace(TRANSFORMS["aes128gcm16"], cipher_key_len=20, icv_len=8)
    with pytest.raises(DatapathError, match="aes128gcm16: 160-bit key not in AES_GCM_16") as e:
        S.xfrm_algorithms(odd)
    assert "ICV 64 bits" in str(e.value)


def test_unknown_transform_names_the_known_ones() -> None:
    with pytest.raises(DatapathError, match=r"unknown transform 'aes-ocb'.*aes128gcm16"):
        S.plan_selftest("aes-ocb")


# --- plans ----------------------------------------------------------------------------------
def test_plan_specs_mirror_each_other() -> None:
    v = S.Variant(Mode.TRANSPORT, True)
    p = S.plan_selftest("aes256-sha256", variant=v, rng=counting_rng())
    a, b = p.spec_a, p.spec_b
    assert (a.local, a.remote) == (ipaddress.ip_address("192.0.2.1"), b.local)
    assert (b.local, b.remote) == (a.remote, a.local)
    assert (b.inbound, b.outbound) == (a.outbound, a.inbound)
    assert a.inbound.spi != a.outbound.spi
    assert a.inbound.encr_key != a.outbound.encr_key
    assert len(a.inbound.integ_key) == 32
    assert a.mode is b.mode is Mode.TRANSPORT
    assert a.encap == b.encap == NatTEncap(4500, 4500)
    assert v.name == "transport+udp"
    assert S.plan_selftest("aes128gcm16", rng=counting_rng()).spec_a.encap is None


def test_plan_payloads_take_the_sizes_in_turn_and_differ() -> None:
    p = S.plan_selftest("aes128gcm16", packets=7, sizes=(64, 512, 1400), rng=counting_rng())
    assert [len(x) for x in p.a_to_b] == [64, 512, 1400, 64, 512, 1400, 64]
    assert len(p.b_to_a) == 7
    assert [struct.unpack_from(">BI", x) for x in p.a_to_b[:2]] == [(0, 0), (0, 1)]
    assert struct.unpack_from(">BI", p.b_to_a[3]) == (1, 3)
    assert len(set(p.a_to_b) | set(p.b_to_a)) == 14


def test_plan_keeps_keys_out_of_its_repr() -> None:
    p = S.plan_selftest("aes128-sha256", rng=counting_rng())
    text = repr(p)
    for key in (p.spec_a.inbound.encr_key, p.spec_a.outbound.integ_key):
        assert key.hex() not in text and repr(key) not in text
    assert "aes128-sha256" in text


def test_plan_needs_a_datagram() -> None:
    with pytest.raises(DatapathError, match="at least one datagram"):
        S.plan_selftest("aes128gcm16", packets=0)


# --- frames on the wire -----------------------------------------------------------------
def frame(proto: int, payload: bytes, ethertype: bytes = b"\x08\x00") -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))  # fmt: skip
    return bytes(12) + ethertype + ip + payload


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data


@pytest.mark.parametrize(
    ("f", "kind"),
    [
        (frame(50, b"\x00\x00\x01\x00" + bytes(40)), "esp"),
        (frame(17, udp(4500, 4500, b"\x00\x00\x01\x00" + bytes(40))), "esp"),
        (frame(17, udp(4500, 4500, bytes(4) + b"IKE...")), "other"),  # non-ESP marker
        (frame(17, udp(5201, 5201, b"\x00\x00\x00\x00\x01hello")), "clear"),
        (frame(17, udp(53, 5353, b"x" * 10)), "other"),
        (frame(1, b"\x08\x00" + bytes(6)), "other"),
        (frame(50, bytes(8), ethertype=b"\x86\xdd"), "other"),
        (bytes(20), "other"),
    ],
)
def test_classify_frame(f: bytes, kind: str) -> None:
    assert S.classify_frame(f, 5201) == kind


# --- verdicts -----------------------------------------------------------------------------------
def sa(packets: int, integrity: int = 0) -> SaCounters:
    return SaCounters(bytes=packets * 100, packets=packets, add_time=1, use_time=2,
                      integrity_failures=integrity)  # fmt: skip


def good(variant: str = "tunnel", n: int = 12) -> S.Observation:
    return S.Observation(
        variant,
        ab=S.Flow(n, 0, n, 0),
        ba=S.Flow(n, 0, n, 0),
        counters_a=ChildSaCounters(inbound=sa(n), outbound=sa(n)),
        counters_b=ChildSaCounters(inbound=sa(n), outbound=sa(n)),
        wire_esp=2 * n,
    )


def test_judge_passes_intact_traffic() -> None:
    r = S.judge("aes128gcm16", [good(), good("transport+udp")], driver="drv", seconds=0.4)
    assert r == S.SelfTestResult(
        "aes128gcm16",
        True,
        48,
        48,
        0,
        "tunnel: 12+12 datagrams intact, 24 ESP frames and no cleartext on the wire; "
        "transport+udp: 12+12 datagrams intact, 24 ESP frames and no cleartext on the wire",
        "drv",
        0.4,
    )


def test_judge_mismatched_keys() -> None:
    """One side's inbound key is wrong: nothing arrives there, its SA says ICV failures."""
    o = replace(
        good(),
        ab=S.Flow(12, 0, 0, 0),
        counters_b=ChildSaCounters(inbound=sa(0, integrity=12), outbound=sa(12)),
    )
    r = S.judge("aes256-sha256", [o, good("transport+udp")], driver=None, seconds=1.0)
    assert not r.passed
    assert (r.sent, r.received, r.corrupted) == (48, 36, 0)
    assert r.detail == (
        "tunnel: A->B: 0 of 12 datagrams arrived; B's inbound SA counted 12 integrity failures "
        "(the ICV did not verify: the driver's output or the keys are wrong)"
    )


def test_judge_altered_and_lost() -> None:
    o = replace(good(), ba=S.Flow(12, 0, 12, 3))
    r = S.judge("t", [o], driver=None, seconds=0)
    assert not r.passed and r.corrupted == 3
    assert r.detail == "tunnel: B->A: 3 arrived altered"


def test_judge_refused_by_the_esp_output_path() -> None:
    o = replace(
        good(),
        ab=S.Flow(12, 12, 0, 0, "EIO: Input/output error"),
        counters_b=ChildSaCounters(inbound=sa(0), outbound=sa(12)),
        wire_esp=12,
    )
    r = S.judge("t", [o], driver="faulty", seconds=0)
    assert r.detail == (
        "tunnel: A->B: the kernel refused 12 of 12 datagrams (EIO: Input/output error) in the "
        "ESP output path: the driver failed to encrypt"
    )


def test_judge_cleartext_and_missing_esp() -> None:
    o = replace(
        good(),
        counters_a=ChildSaCounters(inbound=sa(12), outbound=sa(0)),
        wire_esp=12,
        wire_clear=12,
    )
    r = S.judge("t", [o], driver=None, seconds=0)
    assert r.detail == (
        "tunnel: A's outbound SA counted 0 packets for 12 sent: datagrams did not go through "
        "ESP; 12 test datagrams crossed the wire in the clear; 12 ESP frames on the wire for 24 "
        "datagrams sent"
    )


def test_judge_tolerates_frames_the_capture_lost() -> None:
    assert S.judge("t", [replace(good(), wire_esp=20, wire_lost=4)], driver=None, seconds=0).passed
    assert not S.judge("t", [replace(good(), wire_esp=20)], driver=None, seconds=0).passed


def test_judge_errors_and_nothing() -> None:
    r = S.judge("t", [S.Observation("tunnel", error="installing the SA pair failed: x")],
                driver=None, seconds=0)  # fmt: skip
    assert not r.passed and r.detail == "tunnel: installing the SA pair failed: x"
    r = S.judge("t", [], driver=None, seconds=0)
    assert not r.passed and r.detail == "nothing was tested"


# --- the asyncio edge ---------------------------------------------------------------------------
Plans = Sequence[S.SelfTestPlan]


def test_no_plans_no_work() -> None:
    assert asyncio.run(S.run_selftest([])) == []


def test_a_stuck_worker_is_reported_within_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    stops: list[threading.Event] = []

    def stuck(plans: Plans, timeout: float, stop: threading.Event) -> list[S.SelfTestResult]:
        stops.append(stop)
        stop.wait(5)
        return []

    monkeypatch.setattr(S, "_run_blocking", stuck)
    monkeypatch.setattr(S, "GRACE", 0.1)
    plans = [S.plan_selftest("aes128gcm16", variant=v) for v in S.DEFAULT_VARIANTS]
    t0 = time.monotonic()
    [r] = asyncio.run(S.run_selftest(plans, timeout=0.1))
    assert time.monotonic() - t0 < 1.0
    assert not r.passed and r.transform == "aes128gcm16"
    assert "did not finish within 0.4s" in r.detail
    assert stops[0].is_set()  # the worker is told to stop and clean up


def test_cancelling_stops_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    state: dict[str, float] = {}

    def worker(plans: Plans, timeout: float, stop: threading.Event) -> list[S.SelfTestResult]:
        stop.wait(5)
        state["stopped"] = time.monotonic()
        return []

    monkeypatch.setattr(S, "_run_blocking", worker)

    async def main() -> float:
        task = asyncio.create_task(S.esp_selftest("aes128gcm16", timeout=5))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    done = asyncio.run(main())
    assert "stopped" in state and state["stopped"] <= done  # waited for the worker's clean-up


def test_summary_line() -> None:
    r = S.SelfTestResult("aes128gcm16", False, 48, 24, 0, "tunnel: x", "rfc4106-gcm-aesni", 1.234)
    assert S.summary(r) == (
        "ESP self-test aes128gcm16 on rfc4106-gcm-aesni: FAILED (24/48 datagrams, 1.23s): tunnel: x"
    )
