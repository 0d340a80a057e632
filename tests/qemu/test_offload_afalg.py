"""The AF_ALG engine in the router VM: the kernel's pick and the virtio-crypto driver.

Why in QEMU: the host has no AF_ALG. The router has AES-NI (-cpu max) and a virtio-crypto
device (virtio_crypto_aes_cbc, priority 150, which AES-NI's 400 outranks). This module
runs, with the project as the image installed it:

* what ``AfAlgEngine()`` and ``AfAlgEngine("virtio_crypto_aes_cbc")`` run and on which
  kernel drivers (virtio: exactly the CBC transforms, HMAC-SHA2-256/384/512, inside
  authenc/authencesn);
* offload.kat's whole-ESP known answers and forgeries on both, full and quick;
* byte equality with the software engine both ways, with and without ESN, batches too.

What a seal costs per engine is a benchmark, not a test: `make bench BENCH=offload`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from tests.qemu.offload_guest import SEAL_BOTH

pytestmark = pytest.mark.qemu

VIRTIO = "virtio_crypto_aes_cbc"
#: AES-CBC with HMAC-SHA2-256/384/512 (RFC 4868), as offload/engine.py lists them
CBC = ["aes128-sha256", "aes256-sha256", "aes128-sha384", "aes256-sha384", "aes128-sha512",
       "aes256-sha512"]  # fmt: skip
ALL = ["aes128gcm16", "aes256gcm16", "chacha20poly1305", *CBC]
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-offload-afalg.json"

# Runs inside the router VM with the image's oe_router; the last stdout line is JSON.
# SEAL_BOTH (offload_guest.py) defines seal_both(), the round trip's shared first step.
GUEST = (
    SEAL_BOTH
    + r'''
import json, secrets, sys
from dataclasses import asdict
from oe_router.offload.afalg import AfAlgEngine
from oe_router.offload.engine import TRANSFORMS, AuthenticationFailed, OpenRequest, SealRequest
from oe_router.offload.kat import run_kat
from oe_router.offload.software import SoftwareEngine


def engine(driver):
    e = AfAlgEngine(driver)
    ts = e.transforms()
    return {
        "name": e.name,
        "kind": e.kind.value,
        "transforms": [t.name for t in ts],
        "drivers": {t.name: e.driver(t) for t in ts},
        "why_not": {t.name: e.why_not(t) for t in TRANSFORMS.values() if t not in ts},
    }


def kat(driver):
    e = AfAlgEngine(driver)
    out = {}
    for t in e.transforms():
        full, quick = run_kat(e, t), run_kat(e, t, quick=True)
        out[t.name] = {"full": asdict(full), "quick": asdict(quick)}
    return out


def _packet(t, n):
    n = -(-(n + 2) // t.block_size) * t.block_size
    return secrets.token_bytes(8), secrets.token_bytes(t.iv_len), secrets.token_bytes(n)


def roundtrip(driver):
    """AF_ALG seals, software opens, and the other way; tampering refused; batches."""
    e, sw = AfAlgEngine(driver), SoftwareEngine()
    out, errors = {}, []
    for t in e.transforms():
        cases = 0
        for n in (20, 64, 512, 1400):
            for seq_hi in (None, 0x01020304):
                a, b, hdr, iv, pt, where, ca, cb = seal_both(e, sw, t, n, seq_hi, _packet)
                if ca != cb:
                    errors.append(f"{where}: AF_ALG seal differs from software")
                if b.open(hdr, seq_hi, iv, ca) != pt:
                    errors.append(f"{where}: software did not open AF_ALG's packet")
                if a.open(hdr, seq_hi, iv, cb) != pt:
                    errors.append(f"{where}: AF_ALG did not open software's packet")
                forged = {
                    "icv": (hdr, seq_hi, cb[:-1] + bytes([cb[-1] ^ 1])),
                    "ciphertext": (hdr, seq_hi, bytes([cb[0] ^ 0x80]) + cb[1:]),
                    "spi": (bytes([hdr[0] ^ 1]) + hdr[1:], seq_hi, cb),
                    "esn": (hdr, 7 if seq_hi is None else None, cb),
                }
                for what, (h, s, sealed) in forged.items():
                    try:
                        a.open(h, s, iv, sealed)
                        errors.append(f"{where}: a packet with a wrong {what} opened")
                    except AuthenticationFailed:
                        pass
                if a.seal_many([SealRequest(hdr, seq_hi, iv, pt)] * 3) != [cb] * 3:
                    errors.append(f"{where}: seal_many differs")
                opened = a.open_many([OpenRequest(hdr, seq_hi, iv, cb),
                                      OpenRequest(hdr, seq_hi, iv, forged["icv"][2])])
                if opened != [pt, None]:
                    errors.append(f"{where}: open_many gave {opened!r:.80}")
                a.close()
                b.close()
                cases += 1
        out[t.name] = cases
    return {"transforms": out, "errors": errors}


op, args = sys.argv[1], sys.argv[2:]
driver = (args[0] or None) if args else None
if op == "engine":
    res = engine(driver)
elif op == "kat":
    res = kat(driver)
elif op == "roundtrip":
    res = roundtrip(driver)
print(json.dumps(res))
'''
)


def guest(lab: Lab, op: str, *args: str, timeout: float = 180) -> Any:
    """Run the guest script in the router; its last stdout line is the JSON answer."""
    path = lab.run_dir / "afalg_guest.py"
    path.write_text(GUEST)
    cmd = " ".join(["python3 /lab/afalg_guest.py", op, *map(shlex.quote, args)])
    res = lab.router(cmd, timeout=timeout).check()
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def figures() -> Any:
    out: dict[str, Any] = {}
    yield out
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


def test_kernel_pick_runs_every_transform(lab: Lab, figures: dict[str, Any]) -> None:
    got = guest(lab, "engine", "")
    figures["engine afalg"] = got
    print(f"\n{json.dumps(got, indent=1)}")
    assert got["name"] == "afalg" and got["kind"] == "cpu"
    assert got["transforms"] == ALL and got["why_not"] == {}
    d = got["drivers"]
    assert d["aes128gcm16"] == d["aes256gcm16"] == "rfc4106-gcm-aesni"
    assert d["chacha20poly1305"].startswith("rfc7539esp(")
    for bits in (256, 384, 512):
        assert d[f"aes128-sha{bits}"] == d[f"aes256-sha{bits}"]
        assert d[f"aes128-sha{bits}"].startswith(f"authenc(hmac(sha{bits}-")
        assert d[f"aes128-sha{bits}"].endswith(",cbc-aes-aesni)")  # AES-NI's 400 > virtio's 150


def test_virtio_engine_runs_exactly_cbc(lab: Lab, figures: dict[str, Any]) -> None:
    got = guest(lab, "engine", VIRTIO)
    figures["engine virtio"] = got
    print(f"\n{json.dumps(got, indent=1)}")
    assert got["name"] == f"afalg:{VIRTIO}" and got["kind"] == "hardware"
    assert got["transforms"] == CBC
    for t in CBC:
        drv = got["drivers"][t]
        hmac = f"authenc(hmac({t.split('-')[1]}-"  # its own HMAC's instance, never sha256's
        assert drv.startswith(hmac) and drv.endswith(f",{VIRTIO})"), drv
    assert set(got["why_not"]) == {"aes128gcm16", "aes256gcm16", "chacha20poly1305"}
    assert all("skcipher cbc(aes)) is no AEAD driver" in w for w in got["why_not"].values())


@pytest.mark.parametrize("driver", ["", VIRTIO], ids=["afalg", "virtio"])
def test_kat_passes(lab: Lab, figures: dict[str, Any], driver: str) -> None:
    got = guest(lab, "kat", driver, timeout=600)
    figures[f"kat {driver or 'afalg'}"] = got
    print()
    for name, r in got.items():
        f, q = r["full"], r["quick"]
        print(
            f"  KAT {f['engine']:28} {name:17} {f['driver']:55} full {f['passed']} "
            f"({f['cases']} cases), quick {q['passed']} ({q['cases']})"
        )
    assert sorted(got) == sorted(CBC if driver else ALL)
    for r in got.values():
        for mode in ("full", "quick"):
            assert r[mode]["passed"] and r[mode]["failures"] == [], r[mode]
        assert r["full"]["cases"] > 100 and r["quick"]["cases"] == 3
        if driver:
            assert r["full"]["driver"].endswith(f",{VIRTIO})")


@pytest.mark.parametrize("driver", ["", VIRTIO], ids=["afalg", "virtio"])
def test_byte_equal_to_software(lab: Lab, driver: str) -> None:
    got = guest(lab, "roundtrip", driver, timeout=600)
    assert got["errors"] == []
    assert sorted(got["transforms"]) == sorted(CBC if driver else ALL)
    assert all(n == 8 for n in got["transforms"].values())  # 4 sizes, with and without ESN
