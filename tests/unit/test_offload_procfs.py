"""/proc/crypto parsing and hardware classification, on the lab router's real file.

tests/unit/data/proc_crypto_lab_router.txt was read from the QEMU router VM (Debian
6.1 kernel, -cpu max, a virtio-crypto device) by scripts/record_esp_vectors.py after it
ran ESP with every transform: it holds AES-NI, generic, virtio-crypto and the template
instances (authenc, rfc4106, rfc7539esp) the kernel built for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oe_router.offload.engine import EngineKind
from oe_router.offload.procfs import (
    CryptoAlg,
    classify,
    drivers_for,
    parse_proc_crypto,
    read_proc_crypto,
)

DATA = Path(__file__).parent / "data" / "proc_crypto_lab_router.txt"


@pytest.fixture(scope="module")
def lab() -> tuple[CryptoAlg, ...]:
    return read_proc_crypto(str(DATA))


def _by_driver(algs: tuple[CryptoAlg, ...], driver: str) -> CryptoAlg:
    # The first: the kernel lists some template instances more than once (same fields).
    return next(a for a in algs if a.driver == driver)


def test_every_entry_of_the_lab_file_is_parsed(lab: tuple[CryptoAlg, ...]) -> None:
    assert len(lab) == DATA.read_text().count("\nname ") + DATA.read_text().startswith("name ")
    assert all(a.name and a.driver and a.type != "unknown" for a in lab)


def test_virtio_entry_fields(lab: tuple[CryptoAlg, ...]) -> None:
    v = _by_driver(lab, "virtio_crypto_aes_cbc")
    assert (v.name, v.module, v.priority, v.type) == ("cbc(aes)", "virtio_crypto", 150, "skcipher")
    assert (v.selftest, v.internal, v.async_) == ("passed", False, True)
    assert (v.blocksize, v.min_keysize, v.max_keysize, v.ivsize) == (16, 16, 32, 16)
    assert v.maxauthsize is None and v.digestsize is None and v.extra == ()


def test_aead_entry_fields(lab: tuple[CryptoAlg, ...]) -> None:
    g = _by_driver(lab, "rfc4106-gcm-aesni")
    assert (g.name, g.module, g.type, g.ivsize, g.maxauthsize) == (
        "rfc4106(gcm(aes))",
        "aesni_intel",
        "aead",
        8,
        16,
    )
    assert g.geniv == "<none>"


def test_lab_classification(lab: tuple[CryptoAlg, ...]) -> None:
    hw = {a.driver for a in lab if classify(a) is EngineKind.HARDWARE}
    # Everything virtio-crypto registers, and the template instances built on it.
    assert "virtio_crypto_aes_cbc" in hw
    assert "authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)" in hw
    assert all("virtio" in d for d in hw), hw
    for cpu in ("cbc-aes-aesni", "aes-generic", "rfc4106-gcm-aesni", "sha256-generic",
                "authenc(hmac(sha256-generic),cbc-aes-aesni)",
                "rfc7539esp(chacha20-simd,poly1305-simd)"):  # fmt: skip
        assert classify(_by_driver(lab, cpu)) is EngineKind.CPU, cpu


def test_drivers_for_is_the_kernel_pick_order(lab: tuple[CryptoAlg, ...]) -> None:
    cbc = drivers_for(lab, "cbc(aes)")
    assert [a.driver for a in cbc][:1] == ["cbc-aes-aesni"]  # 400 beats virtio's 150
    assert "virtio_crypto_aes_cbc" in [a.driver for a in cbc]
    assert all(not a.internal and a.selftest == "passed" for a in cbc)
    assert [a.priority for a in cbc] == sorted((a.priority for a in cbc), reverse=True)
    # The internal helpers AES-NI registers (__cbc-aes-aesni) never show.
    assert all(not a.driver.startswith("__") for a in cbc)
    authenc = drivers_for(lab, "authenc(hmac(sha256),cbc(aes))")
    assert authenc[0].driver == "authenc(hmac(sha256-generic),cbc-aes-aesni)"
    assert drivers_for(lab, "no-such(alg)") == []


def test_failed_selftest_is_not_usable(lab: tuple[CryptoAlg, ...]) -> None:
    rsa = _by_driver(lab, "virtio-crypto-rsa")  # its self-test fails at boot in the lab
    assert rsa.selftest == "unknown"
    assert rsa not in drivers_for(lab, "rsa")


SYNTHETIC = """\
name         : authenc(hmac(sha256),cbc(aes))
driver       : safexcel-authenc-hmac-sha256-cbc-aes
module       : crypto_safexcel
priority     : 300
refcnt       : 1
selftest     : passed
internal     : no
type         : aead
async        : yes
blocksize    : 16
ivsize       : 16
maxauthsize  : 32
geniv        : <none>

name         : rfc4106(gcm(aes))
driver       : safexcel-rfc4106-gcm-aes
module       : kernel
priority     : 300
refcnt       : 1
selftest     : passed
internal     : no
type         : aead
async        : yes
blocksize    : 1
ivsize       : 8
maxauthsize  : 16
geniv        : <none>

name         : authenc(hmac(sha256),cbc(aes))
driver       : authenc(hmac(sha256-eip93),cbc(aes-eip93))
module       : crypto_hw_eip93
priority     : 1500
refcnt       : 1
selftest     : passed
internal     : no
type         : aead
async        : yes
blocksize    : 16
ivsize       : 16
maxauthsize  : 32
geniv        : <none>

name         : cbc(aes)
driver       : cbc(aes-eip93)
module       : kernel
priority     : 1500
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher
async        : yes
blocksize    : 16
min keysize  : 16
max keysize  : 32
ivsize       : 16
chunksize    : 16
walksize     : 16

name         : cbc(aes)
driver       : cbc-aes-ce
module       : aes_ce_blk
priority     : 300
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher
async        : no
blocksize    : 16
min keysize  : 16
max keysize  : 32
ivsize       : 16
chunksize    : 16
walksize     : 16

name         : gcm(aes)
driver       : gcm-aes-ce
module       : kernel
priority     : 300
refcnt       : 1
selftest     : passed
internal     : no
type         : aead
async        : no
blocksize    : 1
ivsize       : 12
maxauthsize  : 16
geniv        : <none>

name         : cbc(aes)
driver       : cbc-aes-sun8i-ce
module       : sun8i_ce
priority     : 400
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher
async        : yes
blocksize    : 16
min keysize  : 16
max keysize  : 32
ivsize       : 16
chunksize    : 16
walksize     : 16

name         : cbc(aes)
driver       : cbc-aes-sun8i-ce
module       : kernel
priority     : 400
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher

name         : cbc(aes)
driver       : cbc-aes-neon
module       : aes_neon_blk
priority     : 200
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher

name         : cbc(aes)
driver       : cbc-aes-qce
module       : kernel
priority     : 300
refcnt       : 1
selftest     : passed
internal     : no
type         : skcipher

name         : cbc(aes)
driver       : virtio_crypto_aes_cbc
module       : kernel
priority     : 150
refcnt       : 1
selftest     : unknown
internal     : no
type         : skcipher

name         : sha256
driver       : sha256-avx2
module       : sha256_ssse3
priority     : 170
refcnt       : 1
selftest     : passed
internal     : no
fips         : no
type         : shash
blocksize    : 64
digestsize   : 32

name         : rfc4106(gcm(aes))
driver       : rfc4106-gcm-aesni
module       : aesni_intel
priority     : 400
refcnt       : 1
selftest     : passed
internal     : no
type         : larval
flags        : 0x2405
"""


@pytest.fixture(scope="module")
def synthetic() -> tuple[CryptoAlg, ...]:
    return parse_proc_crypto(SYNTHETIC)


@pytest.mark.parametrize(
    ("driver", "module", "kind"),
    [
        ("safexcel-authenc-hmac-sha256-cbc-aes", "crypto_safexcel", EngineKind.HARDWARE),
        ("safexcel-rfc4106-gcm-aes", "kernel", EngineKind.HARDWARE),  # built in: by name
        ("authenc(hmac(sha256-eip93),cbc(aes-eip93))", "crypto_hw_eip93", EngineKind.HARDWARE),
        ("cbc(aes-eip93)", "kernel", EngineKind.HARDWARE),
        ("cbc-aes-ce", "aes_ce_blk", EngineKind.CPU),  # ARMv8 Crypto Extensions
        ("gcm-aes-ce", "kernel", EngineKind.CPU),
        ("cbc-aes-sun8i-ce", "sun8i_ce", EngineKind.HARDWARE),  # Allwinner's engine
        ("cbc-aes-sun8i-ce", "kernel", EngineKind.HARDWARE),
        ("cbc-aes-neon", "aes_neon_blk", EngineKind.CPU),
        ("cbc-aes-qce", "kernel", EngineKind.HARDWARE),
        ("virtio_crypto_aes_cbc", "kernel", EngineKind.HARDWARE),
        ("sha256-avx2", "sha256_ssse3", EngineKind.CPU),
    ],
)
def test_synthetic_classification(
    synthetic: tuple[CryptoAlg, ...], driver: str, module: str, kind: EngineKind
) -> None:
    (alg,) = [a for a in synthetic if a.driver == driver and a.module == module]
    assert classify(alg) is kind


def test_module_decides_before_the_name() -> None:
    odd = CryptoAlg(name="cbc(aes)", driver="cbc-aes-x", module="virtio-crypto", priority=1,
                    type="skcipher")  # fmt: skip
    assert classify(odd) is EngineKind.HARDWARE  # "-" and "_" are one in module names
    plain = CryptoAlg(name="cbc(aes)", driver="cbc-aes-x", module="kernel", priority=1,
                      type="skcipher")  # fmt: skip
    assert classify(plain) is EngineKind.CPU  # unknown means CPU: hardware is never a guess


def test_synthetic_fields_and_pick(synthetic: tuple[CryptoAlg, ...]) -> None:
    sha = next(a for a in synthetic if a.driver == "sha256-avx2")
    assert sha.digestsize == 32 and sha.extra == (("fips", "no"),)
    larval = synthetic[-1]
    assert larval.type == "larval" and larval.extra == (("flags", "0x2405"),)
    picks = [a.driver for a in drivers_for(synthetic, "cbc(aes)")]
    # eip93 first (1500), then the rest by priority; untested virtio dropped; equal
    # priorities keep the file's order (the kernel takes the first it meets).
    assert picks == ["cbc(aes-eip93)", "cbc-aes-sun8i-ce", "cbc-aes-sun8i-ce", "cbc-aes-ce",
                     "cbc-aes-qce", "cbc-aes-neon"]  # fmt: skip
    # A larval (a lookup in progress) is no implementation, whatever it claims.
    assert [a.driver for a in drivers_for(synthetic, "rfc4106(gcm(aes))")] == [
        "safexcel-rfc4106-gcm-aes"
    ]


def test_odd_input() -> None:
    assert parse_proc_crypto("") == ()
    assert parse_proc_crypto("\n\n\n") == ()
    # A truncated read: an entry without a driver is dropped, the rest kept.
    text = "name : a\n\nname : b\ndriver : b-generic\npriority : x\n"
    (b,) = parse_proc_crypto(text)
    assert (b.name, b.driver, b.module, b.priority, b.extra) == (
        "b",
        "b-generic",
        "kernel",
        0,
        (("priority", "x"),),
    )
    assert read_proc_crypto("/nonexistent/proc/crypto") == ()
