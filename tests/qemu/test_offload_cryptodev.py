"""A real /dev/crypto in the router VM: cryptodev.ko from the image, driven by our binding.

Why in QEMU: the host has no /dev/crypto. The router image carries cryptodev-linux built
against the lab kernel's headers (qemu/build.py); this module loads it (`modprobe cryptodev`),
checks where each transform's sessions land (CIOCGSESSINFO) and what the hardware flag says,
runs offload.kat's known answers and forgeries through it, proves the engine against the
software engine byte for byte (seal, open, tag failures, ESN, batches), measures seal
throughput, and unloads the module again, so the lab is as it was.

virtio-crypto: the router has a virtio-crypto device (virtio_crypto_aes_cbc, priority 150)
and AES-NI (cbc-aes-aesni, 400). cryptodev allocates by algorithm name, so the kernel's pick
wins; ``cryptodev:virtio_crypto_aes_cbc`` reports that, and reaches virtio only while its
priority is raised above AES-NI's through NETLINK_CRYPTO (restored at the end). virtio's
sessions then carry no SIOP_FLAG_KERNEL_DRIVER_ONLY (the driver does not set
CRYPTO_ALG_KERN_DRIVER_ONLY); the engine calls them hardware from /proc/crypto's module.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from tests.qemu.offload_guest import SEAL_BOTH

pytestmark = pytest.mark.qemu

#: AES-CBC with HMAC-SHA2-256/384/512 (RFC 4868), in offload/engine.py's order
CBC = ["aes128-sha256", "aes256-sha256", "aes128-sha384", "aes256-sha384", "aes128-sha512",
       "aes256-sha512"]  # fmt: skip
VIRTIO = "virtio_crypto_aes_cbc"
SIZES = (64, 512, 1400)
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-offload-cryptodev.json"

# Runs inside the router VM with the image's oe_router; the last stdout line is JSON.
# SEAL_BOTH (offload_guest.py) defines seal_both(), the round trip's shared first step.
GUEST = (
    SEAL_BOTH
    + r'''
import json, os, secrets, sys, time
from dataclasses import asdict
from oe_router import ocf_cryptodev as oc
from oe_router.offload.engine import TRANSFORMS, AuthenticationFailed, OpenRequest, SealRequest
from oe_router.offload.software import SoftwareEngine
from oe_router.offload.cryptodev import CryptodevEngine


def sessions():
    """Raw sessions through the binding: where each algorithm lands, and its flags."""
    cases = {
        "gcm(aes) 128": dict(cipher=oc.Alg.AES_GCM, key=bytes(16)),
        "gcm(aes) 256": dict(cipher=oc.Alg.AES_GCM, key=bytes(32)),
        "cbc(aes) 128": dict(cipher=oc.Alg.AES_CBC, key=bytes(16)),
        "cbc(aes) 256": dict(cipher=oc.Alg.AES_CBC, key=bytes(32)),
        "hmac(sha256)": dict(mac=oc.Alg.SHA2_256_HMAC, mackey=bytes(32)),
    }
    out = {}
    with oc.Cryptodev() as dev:
        for label, kw in cases.items():
            s = dev.open_session(**kw)
            info = s.info()
            out[label] = {**asdict(info), "hardware": info.hardware}
            s.close()
    return out


def engine(driver):
    e = CryptodevEngine(driver or None)
    ts = e.transforms()
    return {
        "name": e.name,
        "kind": e.kind.value,
        "transforms": [t.name for t in ts],
        "drivers": {t.name: e.driver(t) for t in ts},
        "hardware": {t.name: e.hardware(t) for t in ts},
        "flagged": {t.name: e.probe(t).flagged for t in ts},
        "unavailable": dict(e.unavailable()),
    }


def _packet(t, n):
    """A plaintext of about n bytes padded to the transform's block, and ESP header fields."""
    n = -(-n // t.block_size) * t.block_size
    return secrets.token_bytes(8), secrets.token_bytes(t.iv_len), secrets.token_bytes(n)


def roundtrip(driver):
    """Byte-equal to the software engine both ways; every tampering is AuthenticationFailed."""
    e, sw = CryptodevEngine(driver or None), SoftwareEngine()
    out, errors = {}, []
    for t in e.transforms():
        cases = 0
        for n in (16, 64, 512, 1400, 4096):
            for seq_hi in (None, 0x01020304):
                a, b, hdr, iv, pt, where, ca, cb = seal_both(e, sw, t, n, seq_hi, _packet)
                if ca != cb:
                    errors.append(f"{where}: seal differs from software")
                if a.open(hdr, seq_hi, iv, cb) != pt or b.open(hdr, seq_hi, iv, ca) != pt:
                    errors.append(f"{where}: open did not give the plaintext back")
                bad = {
                    "icv": cb[:-1] + bytes([cb[-1] ^ 1]),
                    "ciphertext": bytes([cb[0] ^ 0x80]) + cb[1:],
                    "spi": None,
                    "seq_hi": None,
                }
                for what, sealed in bad.items():
                    h, s = hdr, seq_hi
                    if what == "spi":
                        h = bytes([hdr[0] ^ 1]) + hdr[1:]
                    if what == "seq_hi":
                        s = 7 if seq_hi is None else seq_hi + 1
                    try:
                        a.open(h, s, iv, sealed or cb)
                        errors.append(f"{where}: a wrong {what} opened")
                    except AuthenticationFailed:
                        pass
                reqs = [SealRequest(hdr, seq_hi, iv, pt)] * 3
                if a.seal_many(reqs) != [cb] * 3:
                    errors.append(f"{where}: seal_many differs")
                opened = a.open_many(
                    [OpenRequest(hdr, seq_hi, iv, cb), OpenRequest(hdr, seq_hi, iv, bad["icv"])]
                )
                if opened != [pt, None]:
                    errors.append(f"{where}: open_many gave {opened!r:.80}")
                driver_used = a.driver
                a.close()
                b.close()
                cases += 1
        out[t.name] = {"cases": cases, "driver": driver_used}
    return {"transforms": out, "errors": errors}


def kat(driver):
    """offload.kat's whole-ESP known answers and forgeries, through /dev/crypto."""
    from oe_router.offload.kat import run_kat

    e = CryptodevEngine(driver or None)
    return {t.name: asdict(run_kat(e, t)) for t in e.transforms()}


def bench(driver, seconds):
    """Seal throughput per transform and size, this engine and software in the same run."""
    out = {}
    for eng in (CryptodevEngine(driver or None), SoftwareEngine()):
        for t in CryptodevEngine(driver or None).transforms():
            c = eng.cipher(t, bytes(t.encr_key_len), bytes(t.auth_key_len))
            for n in (64, 512, 1400):
                hdr, iv, pt = _packet(t, n)
                count, t0 = 0, time.perf_counter()
                while (el := time.perf_counter() - t0) < seconds:
                    for _ in range(50):
                        c.seal(hdr, None, iv, pt)
                    count += 50
                out[f"{eng.name} {t.name} {n}"] = {
                    "pps": count / el, "mbit": count * len(pt) * 8 / el / 1e6,
                }
            c.close()
    return out


def virtio(priority):
    """cryptodev:virtio_crypto_aes_cbc while virtio's cbc(aes) outranks AES-NI, then restore."""
    from oe_router.offload import crypto_user

    before = crypto_user.get_alg("virtio_crypto_aes_cbc").priority
    crypto_user.set_priority("virtio_crypto_aes_cbc", priority)
    try:
        return {"before": before, "sessions": sessions(),
                "engine": engine("virtio_crypto_aes_cbc"),
                "roundtrip": roundtrip("virtio_crypto_aes_cbc"),
                "kat": kat("virtio_crypto_aes_cbc"),
                "bench": bench("virtio_crypto_aes_cbc", 0.3)}
    finally:
        crypto_user.set_priority("virtio_crypto_aes_cbc", before)


op, args = sys.argv[1], sys.argv[2:]
if op == "sessions":
    res = sessions()
elif op == "engine":
    res = engine(args[0] if args else None)
elif op == "roundtrip":
    res = roundtrip(args[0] if args else None)
elif op == "kat":
    res = kat(args[0] if args else None)
elif op == "bench":
    res = bench(args[0] or None, float(args[1]))
elif op == "virtio":
    res = virtio(int(args[0]))
elif op == "priority":
    from oe_router.offload import crypto_user

    res = crypto_user.set_priority(args[0], int(args[1])).priority
print(json.dumps(res))
'''
)


def guest(lab: Lab, op: str, *args: str, timeout: float = 120) -> Any:
    """Run the guest script in the router; its last stdout line is the JSON answer."""
    path = lab.run_dir / "cryptodev_guest.py"
    path.write_text(GUEST)
    cmd = " ".join(["python3 /lab/cryptodev_guest.py", op, *map(shlex.quote, args)])
    res = lab.router(cmd, timeout=timeout).check()
    return json.loads(res.stdout.strip().splitlines()[-1])


def virtio_priority(lab: Lab) -> str:
    """virtio_crypto_aes_cbc's priority as /proc/crypto shows it."""
    awk = f"awk '/^driver/ {{d=$3}} /^priority/ && d==\"{VIRTIO}\" {{print $3}}' /proc/crypto"
    return lab.router(awk).check().stdout.split()[0]


def loaded(lab: Lab, module: str) -> bool:
    return lab.router(f"grep -q '^{module} ' /proc/modules").ok


@pytest.fixture(scope="module")
def devcrypto(lab: Lab) -> Iterator[Lab]:
    """cryptodev loaded for this module and unloaded after; the image does not load it."""
    assert not loaded(lab, "cryptodev"), "cryptodev is loaded at boot: the image must not"
    assert not lab.router("test -e /dev/crypto").ok
    lab.router("modprobe cryptodev").check()
    try:
        yield lab
    finally:
        lab.router("rmmod cryptodev").check()
        assert not loaded(lab, "cryptodev")
        assert not lab.router("test -e /dev/crypto").ok


def test_module_from_image_gives_dev_crypto(devcrypto: Lab) -> None:
    lab = devcrypto
    assert lab.router("test -c /dev/crypto").ok
    note = lab.router("cat /etc/oe-lab/cryptodev").check().stdout
    assert "08644db02d43478f802755903212f5ee506af73b" in note
    kver = lab.router("uname -r").check().stdout.strip()
    modinfo = lab.router("modinfo -F vermagic cryptodev").check().stdout
    assert modinfo.startswith(kver + " ")
    assert "extra/cryptodev.ko" in lab.router("modinfo -n cryptodev").check().stdout


def test_sessions_land_on_the_kernels_pick(devcrypto: Lab, figures: dict[str, Any]) -> None:
    """CIOCGSESSINFO names the drivers /proc/crypto ranks first; CPU drivers are no hardware."""
    got = guest(devcrypto, "sessions")
    figures["sessions"] = got
    print("\nsession -> driver (CIOCGSESSINFO)")
    for label, info in got.items():
        name = info["cipher_name"] or info["hash_name"]
        drv = info["cipher_driver"] or info["hash_driver"]
        print(f"  {label:14} {name:14} {drv:28} flags={info['flags']} align={info['alignmask']}")
    assert got["gcm(aes) 128"]["cipher_name"] == "gcm(aes)"
    assert "aesni" in got["gcm(aes) 128"]["cipher_driver"]  # generic-gcm-aesni
    assert got["gcm(aes) 256"]["cipher_driver"] == got["gcm(aes) 128"]["cipher_driver"]
    assert got["cbc(aes) 128"]["cipher_driver"] == "cbc-aes-aesni"  # 400 outranks virtio's 150
    assert got["hmac(sha256)"]["hash_name"] == "hmac(sha256)"
    assert got["hmac(sha256)"]["hash_driver"].startswith("hmac(sha256-")
    assert all(not info["hardware"] and info["flags"] == 0 for info in got.values())


def test_engine_lists_what_cryptodev_can_run(devcrypto: Lab) -> None:
    got = guest(devcrypto, "engine")
    print(f"\n{json.dumps(got, indent=1)}")
    assert got["name"] == "cryptodev" and got["kind"] == "cpu"
    assert got["transforms"] == ["aes128gcm16", "aes256gcm16", *CBC]
    assert "no algorithm id" in got["unavailable"]["chacha20poly1305"]
    for t in CBC:  # CRYPTO_SHA2_{256,384,512}_HMAC sessions on the hash's own driver
        assert got["drivers"][t].startswith(f"cbc-aes-aesni+hmac({t.split('-')[1]}-")
    assert not any(got["hardware"].values()) and not any(got["flagged"].values())


def test_driver_engine_reports_where_sessions_land(devcrypto: Lab) -> None:
    """cryptodev cannot ask for a driver: virtio's cbc(aes) loses to AES-NI's, and says so."""
    got = guest(devcrypto, "engine", VIRTIO)
    print(f"\n{json.dumps(got, indent=1)}")
    assert got["name"] == f"cryptodev:{VIRTIO}" and got["transforms"] == []
    for t in CBC:
        assert f"land on cbc-aes-aesni+hmac({t.split('-')[1]}-" in got["unavailable"][t]
        assert f"not {VIRTIO}" in got["unavailable"][t]


def test_seal_open_equal_software(devcrypto: Lab) -> None:
    got = guest(devcrypto, "roundtrip", timeout=300)
    assert got["errors"] == []
    assert set(got["transforms"]) == {"aes128gcm16", "aes256gcm16", *CBC}
    assert all(v["cases"] == 10 for v in got["transforms"].values())


def test_kat_through_dev_crypto(devcrypto: Lab, figures: dict[str, Any]) -> None:
    """Every transform the engine lists passes offload.kat (vectors and forgeries)."""
    got = guest(devcrypto, "kat", timeout=600)
    figures["kat"] = got
    print("\nKAT through /dev/crypto")
    for name, r in got.items():
        print(f"  {name:14} {r['driver']:40} passed={r['passed']} cases={r['cases']}")
    assert set(got) == {"aes128gcm16", "aes256gcm16", *CBC}
    for r in got.values():
        assert r["passed"] and r["cases"] > 0 and r["failures"] == [], r


def test_virtio_when_it_outranks_aesni(devcrypto: Lab, figures: dict[str, Any]) -> None:
    """With virtio's cbc(aes) priority raised over AES-NI's (NETLINK_CRYPTO), the driver
    engine reaches virtio, matches software byte for byte, and the priority is restored."""
    had_crypto_user = loaded(devcrypto, "crypto_user")
    devcrypto.router("modprobe crypto_user").check()
    try:
        got = guest(devcrypto, "virtio", "1000", timeout=300)
        figures["virtio"] = got
    finally:
        if virtio_priority(devcrypto) != "150":  # the guest died before it restored it
            guest(devcrypto, "priority", VIRTIO, "150")
        if not had_crypto_user:
            devcrypto.router("rmmod crypto_user").check()
    print(f"\n{json.dumps(got, indent=1)}")
    eng = got["engine"]
    assert got["before"] == 150
    cbc = got["sessions"]["cbc(aes) 128"]
    assert cbc["cipher_driver"] == VIRTIO
    # virtio_crypto does not set CRYPTO_ALG_KERN_DRIVER_ONLY, so cryptodev's flag is clear;
    # the engine still calls it hardware from /proc/crypto (module virtio_crypto)
    assert cbc["flags"] == 0 and not cbc["hardware"]
    assert eng["transforms"] == CBC
    assert eng["drivers"]["aes128-sha256"].startswith(f"{VIRTIO}+hmac(sha256-")
    assert eng["kind"] == "hardware" and all(eng["hardware"].values())
    assert not any(eng["flagged"].values())
    assert got["roundtrip"]["errors"] == []
    for name, r in got["kat"].items():
        print(f"KAT {name} on {r['driver']}: passed={r['passed']} cases={r['cases']}")
        assert r["driver"].startswith(VIRTIO) and r["passed"] and r["failures"] == [], r
    assert set(got["kat"]) == set(CBC)
    assert virtio_priority(devcrypto) == "150"
    rows = got["bench"]
    print("\nvirtio via /dev/crypto vs software, seal")
    for k, v in rows.items():
        print(f"  {k:40} {v['pps']:9.0f} pkt/s {v['mbit']:8.1f} Mbit/s")


def test_seal_throughput(devcrypto: Lab, figures: dict[str, Any]) -> None:
    rows = guest(devcrypto, "bench", "", "0.3", timeout=300)
    figures["seal"] = rows
    print("\nseal throughput, /dev/crypto vs software (same run)")
    for k, v in rows.items():
        print(f"  {k:40} {v['pps']:9.0f} pkt/s {v['mbit']:8.1f} Mbit/s")
    for t in ("aes128gcm16", "aes256gcm16", "aes128-sha256", "aes256-sha256"):
        for n in SIZES:
            assert rows[f"cryptodev {t} {n}"]["pps"] > 0
