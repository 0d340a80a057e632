"""offload.faults and offload.make_engine: a silently corrupting engine, switched on only by
OE_ROUTER_FAULT, counted across the engine; engine names; nothing heavy at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oe_router.offload import make_engine
from oe_router.offload.engine import (
    TRANSFORMS,
    AuthenticationFailed,
    EngineError,
    EngineKind,
    OpenRequest,
    SealRequest,
)
from oe_router.offload.faults import FAULT_ENV, Fault, FaultyEngine, apply_faults, parse_faults
from oe_router.offload.software import SoftwareEngine

GCM = TRANSFORMS["aes256gcm16"]
CBC = TRANSFORMS["aes256-sha256"]
KEY = bytes(range(36))
HDR = b"\x00\x00\x10\x01\x00\x00\x00\x07"


def _req(i: int) -> SealRequest:
    return SealRequest(HDR[:4] + i.to_bytes(4, "big"), None, i.to_bytes(16, "big"), bytes(64))


def test_the_first_n_seals_are_exact_then_every_one_is_corrupt_across_ciphers() -> None:
    clean = SoftwareEngine().cipher(GCM, KEY)
    faulty = FaultyEngine(SoftwareEngine(), corrupt_after=3)
    a, b = faulty.cipher(GCM, KEY), faulty.cipher(GCM, KEY)
    outs = [
        a.seal(HDR, None, bytes(8), bytes(64)),
        b.seal(HDR, None, bytes(8), bytes(64)),
        a.seal(HDR, None, bytes(8), bytes(64)),
        b.seal(HDR, None, bytes(8), bytes(64)),  # the 4th seal of the engine
        a.seal(HDR, None, bytes(8), bytes(64)),
    ]
    good = clean.seal(HDR, None, bytes(8), bytes(64))
    assert outs[:3] == [good] * 3
    for bad in outs[3:]:
        assert len(bad) == len(good)
        assert sum(x != y for x, y in zip(bad, good, strict=True)) == 1
        with pytest.raises(AuthenticationFailed):  # the peer's ICV check rejects it
            clean.open(HDR, None, bytes(8), bad)
    # opening is never corrupted: the fault is on the send side only
    assert a.open(HDR, None, bytes(8), good) == bytes(64)


def test_batched_seals_count_in_order() -> None:
    clean = SoftwareEngine().cipher(CBC, KEY[:32], KEY[:32])
    faulty = FaultyEngine(SoftwareEngine(), corrupt_after=5).cipher(CBC, KEY[:32], KEY[:32])
    batch = [_req(i) for i in range(4)]
    first = faulty.seal_many(batch)
    second = faulty.seal_many(batch)
    want = clean.seal_many(batch)
    assert first == want
    assert second[0] == want[0] and second[1:] != want[1:]
    assert all(x != y for x, y in zip(second[1:], want[1:], strict=True))
    opened = clean.open_many(
        [OpenRequest(r.hdr, r.seq_hi, r.iv, c) for r, c in zip(batch, second, strict=True)]
    )
    assert opened[0] == bytes(64) and opened[1:] == [None, None, None]


def test_a_faulty_engine_looks_like_its_inner_engine() -> None:
    faulty = FaultyEngine(SoftwareEngine(), corrupt_after=0)
    assert faulty.name == "software" and faulty.kind is EngineKind.CPU
    assert faulty.transforms() == SoftwareEngine().transforms()
    assert faulty.driver(GCM) == "openssl"
    assert faulty.cipher(GCM, KEY).transform is GCM
    with pytest.raises(ValueError, match="corrupt_after"):
        FaultyEngine(SoftwareEngine(), corrupt_after=-1)


def test_fault_specs_parse_with_colons_in_engine_names() -> None:
    assert parse_faults("afalg:virtio_crypto_aes_cbc:corrupt_after=500") == {
        "afalg:virtio_crypto_aes_cbc": Fault(corrupt_after=500)
    }
    assert parse_faults(" software:corrupt_after=0 ; cryptodev:corrupt_when=/tmp/oe fault;") == {
        "software": Fault(corrupt_after=0),
        "cryptodev": Fault(corrupt_when="/tmp/oe fault"),
    }
    bad_specs = (
        "software",
        "software:corrupt=1",
        ":corrupt_after=1",
        "software:corrupt_after=x",
        "software:corrupt_after=-2",
        "software:corrupt_when=",
        "corrupt_after=1",
    )
    for bad in bad_specs:
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_faults(bad)


def test_a_trigger_file_switches_corruption_on_and_off(tmp_path: Path) -> None:
    now = [0.0]
    flag = tmp_path / "oe-fault"
    engine = FaultyEngine(SoftwareEngine(), corrupt_when=str(flag), clock=lambda: now[0])
    clean = SoftwareEngine().cipher(GCM, KEY).seal(HDR, None, bytes(8), bytes(64))
    c = engine.cipher(GCM, KEY)
    assert c.seal(HDR, None, bytes(8), bytes(64)) == clean
    flag.touch()
    assert c.seal(HDR, None, bytes(8), bytes(64)) == clean  # looked at most every 50 ms
    now[0] += 0.06
    assert c.seal(HDR, None, bytes(8), bytes(64)) != clean
    assert c.seal_many([SealRequest(HDR, None, bytes(8), bytes(64))]) != [clean]
    flag.unlink()
    now[0] += 0.06
    assert c.seal(HDR, None, bytes(8), bytes(64)) == clean
    assert engine.seals == 5


def test_the_seal_trigger_can_be_moved_and_the_inner_engine_stays_reachable() -> None:
    inner = SoftwareEngine()
    engine = FaultyEngine(inner, corrupt_after=10**9)
    c = engine.cipher(GCM, KEY)
    good = c.seal(HDR, None, bytes(8), bytes(16))
    engine.corrupt_after = engine.seals
    assert c.seal(HDR, None, bytes(8), bytes(16)) != good
    with pytest.raises(ValueError, match="corrupt_after or corrupt_when"):
        FaultyEngine(inner)
    with pytest.raises(AttributeError):
        _ = engine.no_such_thing  # type: ignore[attr-defined]


def test_make_engine_wraps_only_the_engine_the_environment_names() -> None:
    env = {FAULT_ENV: "software:corrupt_after=1"}
    engine = make_engine("software", env)
    assert isinstance(engine, FaultyEngine) and engine.corrupt_after == 1
    assert isinstance(make_engine("software", {}), SoftwareEngine)
    other = {FAULT_ENV: "afalg:virtio_crypto_aes_cbc:corrupt_after=1"}
    assert isinstance(make_engine("software", other), SoftwareEngine)
    assert apply_faults(SoftwareEngine(), {}).name == "software"
    c = engine.cipher(GCM, KEY)
    good = c.seal(HDR, None, bytes(8), bytes(16))
    assert c.seal(HDR, None, bytes(8), bytes(16)) != good


def test_make_engine_refuses_unknown_names_naming_the_choices() -> None:
    for bad in ("openssl", "afalg:", "cryptodev:", "software:x", ""):
        with pytest.raises(EngineError, match="afalg:<driver>"):
            make_engine(bad, {})


def test_importing_offload_loads_no_engine_and_no_cryptography() -> None:
    code = (
        "import sys, oe_router.offload as o; "
        "assert callable(o.make_engine); "
        "heavy = [m for m in sys.modules if m.startswith('cryptography') "
        "or m in ('oe_router.offload.software', 'oe_router.offload.afalg', "
        "'oe_router.offload.cryptodev', 'oe_router.offload.kat')]; "
        "print(heavy); assert not heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
