#!/usr/bin/env python3
"""Build the packaged ESP known-answer vectors (src/oe_router/offload/vectors/*.json).

Why a generator: the sources speak other layouts (Wycheproof: key, nonce, AAD; the
kernel recording: packets), and the KAT runner wants one shape, the ESP one of
offload/engine.py: encryption key (cipher key || salt), integrity key, hdr = SPI ||
seq_lo, seq_hi (ESN) or null, IV, plaintext, sealed = ciphertext || ICV. Each vector
names its source; nothing is computed where a source gives the answer.

    .venv/bin/python scripts/make_kat_vectors.py          # rewrite the files
    .venv/bin/python scripts/make_kat_vectors.py --check  # exit 1 if they would change

Sources (``VENDOR_DIR`` or ../shared/vendor for Wycheproof):

* Wycheproof (Apache-2.0): AES-GCM and ChaCha20-Poly1305 with a 12-byte nonce (salt =
  nonce[:4], ESP IV = nonce[4:]) and 8 or 12 bytes of AAD (SPI || seq_lo, or SPI ||
  seq_hi || seq_lo); AES-CBC whose message and PKCS#5 padding, whole blocks, are the
  ESP plaintext, with an ICV this script computes (HMAC-SHA256 over SPI || seq_lo || IV ||
  C [|| seq_hi], RFC 4303 §3.3.2.1, Python's hmac) because Wycheproof has no such
  vector; "ModifiedTag" cases of AES-GCM, ChaCha20-Poly1305 and HMAC-SHA256 as XOR
  patterns (invalid tag XOR the valid one) that the runner applies to ESP vectors.
  HMAC-SHA256's own vectors do not fit the layout (no message of 24 + 16k bytes with a
  256-bit key and a 128-bit tag but the empty-ciphertext one), so only their patterns
  are used. HMAC-SHA384-192 and HMAC-SHA512-256 (RFC 4868) get the same AES-CBC
  payloads with ICVs from the ``cryptography`` library's HMAC, itself checked against
  RFC 4231 Test Case 2 each run; their tag patterns are Wycheproof's HMAC-SHA512 ones.
* draft-mcgrew-gcm-test-01 §4 (AES-GCM ESP packets, 128- and 256-bit keys; the 192-bit
  one is skipped), RFC 7634 Appendix A (ChaCha20-Poly1305 ESP packet).
* The Linux kernel's ESP, recorded in the lab's router VM by scripts/record_esp_vectors.py
  (tests/qemu/data/kernel_esp_recorded.json): every transform, with and without ESN.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENDOR = Path(os.environ.get("VENDOR_DIR", REPO.parent / "shared" / "vendor"))
WYCHEPROOF = VENDOR / "wycheproof"
RECORDED = REPO / "tests" / "qemu" / "data" / "kernel_esp_recorded.json"
OUT = REPO / "src" / "oe_router" / "offload" / "vectors"

SOURCES: dict[str, dict[str, str]] = {
    "wycheproof": {
        "what": "Project Wycheproof test vectors, testvectors_v1 at C2SP/wycheproof "
        "dac1dd4729fd; a subset, re-laid out to ESP by scripts/make_kat_vectors.py",
        "url": "https://github.com/C2SP/wycheproof",
        "licence": "Apache-2.0 (http://www.apache.org/licenses/LICENSE-2.0); "
        "Copyright Google LLC and the Wycheproof authors; the licence text is "
        "LICENSE-wycheproof in this folder",
    },
    "draft-mcgrew-gcm-test-01": {
        "what": "Test Cases for the use of GCM and GMAC in IPsec ESP, section 4 "
        "(D. McGrew, 2009): whole ESP payloads, AAD SPI || [seq_hi ||] seq_lo",
        "url": "https://datatracker.ietf.org/doc/html/draft-mcgrew-gcm-test-01",
        "licence": "IETF Trust, BCP 78 (test data of an Internet-Draft)",
    },
    "rfc7634": {
        "what": "RFC 7634 Appendix A, ESP example with ChaCha20-Poly1305",
        "url": "https://www.rfc-editor.org/rfc/rfc7634#appendix-A",
        "licence": "IETF Trust, BCP 78 (Simplified BSD for code components)",
    },
    "linux-esp": {
        "what": "Packets sealed by the Linux kernel's ESP (net/ipv4/esp4.c) in the "
        "oe-router QEMU lab's router VM, fixed keys, plaintext rebuilt from the "
        "datagram sent (scripts/record_esp_vectors.py)",
        "url": "tests/qemu/data/kernel_esp_recorded.json",
        "licence": "recorded for this project",
    },
    "generator": {
        "what": "the ICV of a Wycheproof AES-CBC vector: HMAC-SHA256 (Python's hmac) "
        "over SPI || seq_lo || IV || C [|| seq_hi], truncated to 16 bytes, with the "
        "integrity key below",
        "url": "scripts/make_kat_vectors.py",
        "licence": "-",
    },
    "generator-sha2": {
        "what": "the ICV of a Wycheproof AES-CBC vector: HMAC-SHA384 or HMAC-SHA512 "
        "(the cryptography library, checked against RFC 4231 Test Case 2 first) over "
        "SPI || seq_lo || IV || C [|| seq_hi], truncated to 24 or 32 bytes (RFC 4868), "
        "with the integrity key below; the modified-tag patterns are Wycheproof's "
        "HMAC-SHA512 ones cut to the ICV length",
        "url": "scripts/make_kat_vectors.py",
        "licence": "-",
    },
}

# draft-mcgrew-gcm-test-01 §4: (key, salt || IV, AAD, plaintext, ciphertext || ICV).
DRAFT_GCM: tuple[tuple[str, str, str, str, str], ...] = (
    ("4c80cdefbb5d10da906ac73c3613a634", "2e443b684956ed7e3b244cfe", "000043218765432100000000",
     "45000048699a000080114db7c0a80102c0a801010a9bf15638d301000001000000000000045f7369700"
     "45f756470037369700963796265726369747902646b000021000101020201",
     "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34cfa2436f14a3f3cf659"
     "25bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce61bc17d768fd9732459018148f6cbe722fd047"
     "96562dfdb4"),
    ("feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888", "0000a5f80000000a",
     "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d0010000010000000000000373"
     "69700963796265726369747902646b00000100010001",
     "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c3de81827c10e9a4f5133"
     "0d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd183b70d3aa8bc6ee4c309e9d85a41ad4a"),
    ("abbccddef00112233445566778899aababbccddef00112233445566778899aab",
     "112233440102030405060708", "4a2cbfe300000002",
     "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee0000000007002400020bf0000020405"
     "b40101040201020201",
     "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d347f05"
     "45659f14e99def842d8eb335f4eecfdbf831824b4c4915956c96"),
    ("00000000000000000000000000000000", "000000000000000000000000", "0000000000000001",
     "4500003c99c500008001cb7a40679318010101010800075c020044006162636465666768696a6b6c6d6e"
     "6f707172737475767761626364656667686901020201",
     "4688daf2f973a392732909c331d56d60f694abaa414b5e7ff5fdcdfff5e9a284456476492719ffb64de7"
     "d9dca1e1d894bc3bd57873ed4d181d19d4d5c8c18af3f821d496eeb096e98ad2b69e4799c71d"),
    ("3de09874b388e6491988d0c3607eae1f", "57690e434e280000a2fca1a3", "42f67e3f1010101010101010",
     "4500003c99c300008001cb7c40679318010101010800085c020043006162636465666768696a6b6c6d6e"
     "6f707172737475767761626364656667686901020201",
     "fba2caa4853cf9f0f22cb10d86dd83b0fec75691cf1a04b00d1138ec9c35791765acbd8701ad79845bf9"
     "fe3fba487bc91755e6662b4c8d0d1f5e22739530320ae0d731cc978ecafaeae88f00e80d6e48"),
    ("3de09874b388e6491988d0c3607eae1f", "57690e434e280000a2fca1a3", "42f67e3f1010101010101010",
     "4500001c42a200008001441f406793b6e00000020a00f5ff01020201",
     "fba2ca845e5df9f0f22c3e6e86dd831e1fc65792cd1af9130e1379ed369f071f35e034be95f112e4e7d0"
     "5d35"),
    ("abbccddef00112233445566778899aab", "decaf888cafedebaceface74", "000001000000000000000001",
     "4500004933ba00007f119106c3fb1d10c2b1d326c02831ce0035dd7b800302d500004e20001e8c18d75b"
     "81dc91baa0476b91b924b280389d92c963bac046ec959b6266c04722b14923010101",
     "18a6fd42f72cbf4ab2a2ea901f73d814e3e7f243d95412e1c349c1d2fbec168f9190feebaf2cb01984e6"
     "5863965d7472b79da345e0e780191f0d2f0e0f496c226f2127b27db35724e7845d68651f57e65f354f75"
     "ff17015769623436"),
    ("abbccddef00112233445566778899aababbccddef00112233445566778899aab",
     "73616c74616e640169766563", "17405e67156f3126dd0db99b",
     "45080028732c00004006e9f90a0106120a01038f06b88023dd6bafbecb71260250101f646d540001",
     "f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57ff4d3a31ce673119e4516"
     "26c2415771e3b7eebca614c89b35"),
    ("3de09874b388e6491988d0c3607eae1f", "57690e434e280000a2fca1a3", "42f67e3f1010101010101010",
     "45000049333e00007f119182c3fb1d10c2b1d326c02831ce0035cb458003025b000001e0001e8c18d657"
     "59d52284a0352c71475c8880391c764d6e5ee0496b325ae270c03899493915010101",
     "fba2cad12fc1f9f00d3cebf305410db83d7784b607323d220f24b0a97d54182800cadb0f68d99ef0e0c0"
     "c89ae9bea8884e52d65bc1afd0740f742444747b5b39ab533163aad4550ee5160975cdb608c576918960"
     "9763b8e18caa81e2"),
    ("abbccddef00112233445566778899aababbccddef00112233445566778899aab",
     "73616c74616e640169766563", "17405e67156f3126dd0db99b",
     "636973636f0172756c657301746865016e6574776501646566696e6501746865746563686e6f6c6f6769"
     "6573017468617477696c6c01646566696e65746f6d6f72726f7701020201",
     "d4b7ed86a1777f2ea13d6973d324c69e7b43f826fb56831226508bebd2dceb18d0a6df10e5487df07411"
     "3e14c641024e3e6773d91a62ee429b043a10e3efe6b012a49363412364f8c0cac587f249e56b11e24f30"
     "e44ccc76"),
    ("7d773d00c144c525ac619d18c84a3f47", "d966426743457e9182443bc6", "335467aeffffffff",
     "01020201", "437f866bcb3f699fe9b0822bac961c4504bef270"),
    ("abbccddef00112233445566778899aab", "decaf888cafedebaceface74", "000001000000000000000001",
     "746f016265016f72016e6f7401746f0162650001",
     "29c9fc69a197d038ccdd14e2ddfcaa0543332164412503524303ed3c6c5f283843af8c3e"),
    ("6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961",
     "7475726e333021696765746d", "796b6963ffffffffffffffff",
     "45000030da3a00008001df3bc0a80005c0a800010800c6cd020007006162636465666768696a6b6c6d6e"
     "6f707172737401020201",
     "f97ab2aa356d8edce17644ac8c78e25dd24dedbb29ebf1b64a274b39b49c3a864cd3d78ca4ae68a32b42"
     "458fb57dbe821dcc63b9d0937ba2945f669368661a329fb4c053"),
)  # fmt: skip

# RFC 7634 Appendix A: key, salt || IV, AAD (SPI || seq), plaintext, ciphertext || tag.
RFC7634_A = (
    "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
    "a0a1a2a31011121314151617",
    "0102030400000005",
    "45000054a6f200004001e778c6336405c000020508005b7a3a080000553bec100007362708090a0b0c0d0e"
    "0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233343536370102"
    "0204",
    "24039428b97f417e3c13753a4f05087b67c352e6a7fab1b982d466ef407ae5c614ee8099d52844eb61aa95"
    "dfab4c02f72aa71e7c4c4f64c9befe2facc638e8f3cbec163fac469b502773f6fb94e664da9165b82829f6"
    "41e076aaa8266b7fb0f7b11b369907e1ad43",
)

# Wycheproof tcIds taken (all valid, 12-byte nonce, 8- or 12-byte AAD, 128-bit tag).
GCM_TCIDS = {128: (3, 12), 256: (91, 101)}
CHACHA_TCIDS = (1, 102, 5, 11, 33, 35, 37, 69, 73, 75, 79, 81)
CBC_MSG_LENS = (0, 1, 15, 16, 17, 31, 32, 48, 80)
CBC_INTEG_KEY = hashlib.sha256(b"oe-router KAT: integrity key for Wycheproof AES-CBC").digest()


def _wycheproof(name: str) -> dict[str, Any]:
    path = WYCHEPROOF / name
    if not path.exists():
        raise SystemExit(f"{path} missing: set VENDOR_DIR to the folder holding wycheproof/")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _tests(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, t) for g in data["testGroups"] for t in g["tests"]]


def _layout(aad: bytes) -> tuple[bytes, int | None]:
    """hdr and seq_hi from an ESP AAD: SPI || seq_lo, or SPI || seq_hi || seq_lo."""
    if len(aad) == 8:
        return aad, None
    return aad[:4] + aad[8:12], int.from_bytes(aad[4:8], "big")


def _vector(
    vid: str, source: str, transform: str, key: str, nonce: str, aad: str, pt: str, sealed: str
) -> dict[str, Any]:
    hdr, seq_hi = _layout(bytes.fromhex(aad))
    return {
        "id": vid,
        "source": source,
        "transform": transform,
        "encr_key": key + nonce[:8],
        "integ_key": "",
        "hdr": hdr.hex(),
        "seq_hi": seq_hi,
        "iv": nonce[8:],
        "plaintext": pt,
        "sealed": sealed,
    }


def _recorded(transforms: tuple[str, ...]) -> list[dict[str, Any]]:
    data = json.loads(RECORDED.read_text())
    out = []
    n = 0
    for v in data["vectors"]:
        if v["transform"] not in transforms:
            continue
        n += 1
        esn = "ESN" if v["seq_hi"] is not None else "32-bit seq"
        out.append(
            {
                "id": f"linux {data['kernel']} esp4 {v['transform']} {esn} #{n}",
                "source": "linux-esp",
                **{k: v[k] for k in ("transform", "encr_key", "integ_key", "hdr", "seq_hi")},
                **{k: v[k] for k in ("iv", "plaintext", "sealed")},
            }
        )
    return out


def _modified_tags(kind: str) -> list[dict[str, str]]:
    """Wycheproof's ModifiedTag cases as XOR patterns over the right tag (deduplicated)."""
    from cryptography.hazmat.primitives.ciphers import aead

    file = {
        "gcm": "aes_gcm_test.json",
        "chacha": "chacha20_poly1305_test.json",
        "hmac": "hmac_sha256_test.json",
    }[kind]
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for g, t in _tests(_wycheproof(file)):
        if "ModifiedTag" not in t["flags"] or g.get("tagSize") != 128:
            continue
        key, msg = bytes.fromhex(t["key"]), bytes.fromhex(t["msg"])
        if kind == "hmac":
            right = hmac.new(key, msg, "sha256").digest()[:16]
        else:
            if g["ivSize"] != 96:
                continue
            impl = aead.AESGCM(key) if kind == "gcm" else aead.ChaCha20Poly1305(key)
            right = impl.encrypt(bytes.fromhex(t["iv"]), msg, bytes.fromhex(t["aad"]))[-16:]
        bad = bytes.fromhex(t["tag"])
        xor = bytes(a ^ b for a, b in zip(bad, right, strict=True)).hex()
        if xor in seen:
            continue
        seen.add(xor)
        out.append(
            {
                "id": f"wycheproof {file} tcId {t['tcId']}",
                "source": "wycheproof",
                "comment": t["comment"],
                "xor": xor,
            }
        )
    return out


def gcm() -> dict[str, Any]:
    vectors = _recorded(("aes128gcm16", "aes256gcm16"))
    tests = _tests(_wycheproof("aes_gcm_test.json"))
    for bits, ids in GCM_TCIDS.items():
        for g, t in tests:
            if g["keySize"] == bits and t["tcId"] in ids:
                assert g["ivSize"] == 96 and g["tagSize"] == 128 and t["result"] == "valid"
                vectors.append(
                    _vector(f"wycheproof aes_gcm_test.json tcId {t['tcId']}", "wycheproof",
                            f"aes{bits}gcm16", t["key"], t["iv"], t["aad"], t["msg"],
                            t["ct"] + t["tag"])
                )  # fmt: skip
    for key, nonce, aad, pt, sealed in DRAFT_GCM:
        seq = "seq " + (aad[8:] if len(aad) == 16 else f"{aad[8:16]} {aad[16:]} (ESN)")
        vectors.append(
            _vector(f"draft-mcgrew-gcm-test-01 AES-{len(key) * 4} SPI {aad[:8]} {seq}, "
                    f"{len(pt) // 2}-byte payload",
                    "draft-mcgrew-gcm-test-01", f"aes{len(key) * 4}gcm16", key, nonce, aad, pt,
                    sealed)
        )  # fmt: skip
    return {"modified_tags": _modified_tags("gcm"), "vectors": vectors}


def chacha() -> dict[str, Any]:
    vectors = _recorded(("chacha20poly1305",))
    key, nonce, aad, pt, sealed = RFC7634_A
    vectors.append(
        _vector("RFC 7634 Appendix A", "rfc7634", "chacha20poly1305", key, nonce, aad, pt, sealed)
    )
    by_id = {t["tcId"]: (g, t) for g, t in _tests(_wycheproof("chacha20_poly1305_test.json"))}
    for tc in CHACHA_TCIDS:
        g, t = by_id[tc]
        assert g["ivSize"] == 96 and len(t["aad"]) in (16, 24) and t["result"] == "valid"
        vectors.append(
            _vector(f"wycheproof chacha20_poly1305_test.json tcId {tc}", "wycheproof",
                    "chacha20poly1305", t["key"], t["iv"], t["aad"], t["msg"], t["ct"] + t["tag"])
        )  # fmt: skip
    return {"modified_tags": _modified_tags("chacha"), "vectors": vectors}


#: RFC 4231 §4.3 (Test Case 2: key "Jefe"), the generator's HMAC checked before any ICV
#: it computes for SHA-384 and SHA-512 (RFC 4868 §2.7 points to these values).
RFC4231_TC2 = {
    "sha256": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    "sha384": "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
    "8e2240ca5e69e2c78b3239ecfab21649",
    "sha512": "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
    "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
}
#: RFC 4868 §2.3: the integrity key is the hash's full output, the ICV half of it.
HMAC_SIZES = {"sha256": (32, 16), "sha384": (48, 24), "sha512": (64, 32)}


def _hmac_icv(hash_name: str, key: bytes, data: bytes) -> bytes:
    """The ICV through ``cryptography``'s HMAC (checked against RFC 4231 first)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as chmac

    algo = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[hash_name]
    check = chmac.HMAC(b"Jefe", algo())
    check.update(b"what do ya want for nothing?")
    assert check.finalize().hex() == RFC4231_TC2[hash_name], f"HMAC-{hash_name} is not RFC 4231's"
    mac = chmac.HMAC(key, algo())
    mac.update(data)
    return mac.finalize()[: HMAC_SIZES[hash_name][1]]


def _truncated_tags(hash_name: str) -> list[dict[str, str]]:
    """Wycheproof's HMAC-SHA512 ModifiedTag patterns (256-bit tags) cut to this ICV's
    length: bit flips at the tag's start, end and middle, whichever hash made the tag."""
    icv = HMAC_SIZES[hash_name][1]
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for g, t in _tests(_wycheproof("hmac_sha512_test.json")):
        if "ModifiedTag" not in t["flags"] or g.get("tagSize") != 256:
            continue
        key, msg = bytes.fromhex(t["key"]), bytes.fromhex(t["msg"])
        right = hmac.new(key, msg, "sha512").digest()[:32]
        bad = bytes.fromhex(t["tag"])
        xor = bytes(a ^ b for a, b in zip(bad, right, strict=True))[:icv]
        if not any(xor) or xor.hex() in seen:
            continue
        seen.add(xor.hex())
        out.append(
            {
                "id": f"wycheproof hmac_sha512_test.json tcId {t['tcId']} (first {icv} bytes)",
                "source": "wycheproof",
                "comment": t["comment"],
                "xor": xor.hex(),
            }
        )
    return out


def cbc(hash_name: str = "sha256") -> dict[str, Any]:
    """AES-CBC ESP payloads from Wycheproof with HMAC-``hash_name`` ICVs (and, for
    SHA-256, the kernel's recorded packets)."""
    key_len, _ = HMAC_SIZES[hash_name]
    if hash_name == "sha256":
        vectors = _recorded(("aes128-sha256", "aes256-sha256"))
        integ_key = CBC_INTEG_KEY
    else:
        vectors = []
        integ_key = hashlib.sha512(
            f"oe-router KAT: {hash_name} integrity key for Wycheproof AES-CBC".encode()
        ).digest()[:key_len]
    for g, t in _tests(_wycheproof("aes_cbc_pkcs5_test.json")):
        msg = bytes.fromhex(t["msg"])
        if g["keySize"] not in (128, 256) or t["result"] != "valid":
            continue
        if len(msg) not in CBC_MSG_LENS:
            continue
        pad = 16 - len(msg) % 16
        pt, ct, iv = msg + bytes([pad]) * pad, bytes.fromhex(t["ct"]), bytes.fromhex(t["iv"])
        assert len(ct) == len(pt)
        tc = t["tcId"]
        hdr = (0x1000 + tc).to_bytes(4, "big") + tc.to_bytes(4, "big")
        seq_hi = 0x00ABCD00 + tc if tc % 2 else None  # every other one with ESN
        tail = b"" if seq_hi is None else seq_hi.to_bytes(4, "big")
        if hash_name == "sha256":  # as the files were first made (Python's hmac)
            icv = hmac.new(integ_key, hdr + iv + ct + tail, "sha256").digest()[:16]
            assert icv == _hmac_icv("sha256", integ_key, hdr + iv + ct + tail)
        else:
            icv = _hmac_icv(hash_name, integ_key, hdr + iv + ct + tail)
        vectors.append(
            {
                "id": f"wycheproof aes_cbc_pkcs5_test.json tcId {tc} (ICV by the generator)",
                "source": "wycheproof",
                "transform": f"aes{g['keySize']}-{hash_name}",
                "encr_key": t["key"],
                "integ_key": integ_key.hex(),
                "hdr": hdr.hex(),
                "seq_hi": seq_hi,
                "iv": iv.hex(),
                "plaintext": pt.hex(),
                "sealed": (ct + icv).hex(),
            }
        )
    tags = _modified_tags("hmac") if hash_name == "sha256" else _truncated_tags(hash_name)
    return {"modified_tags": tags, "vectors": vectors}


FAMILIES = {
    "esp_aes_gcm.json": (gcm, ("wycheproof", "draft-mcgrew-gcm-test-01", "linux-esp")),
    "esp_chacha20_poly1305.json": (chacha, ("wycheproof", "rfc7634", "linux-esp")),
    "esp_aes_cbc_hmac_sha256.json": (cbc, ("wycheproof", "generator", "linux-esp")),
    "esp_aes_cbc_hmac_sha384.json": (lambda: cbc("sha384"), ("wycheproof", "generator-sha2")),
    "esp_aes_cbc_hmac_sha512.json": (lambda: cbc("sha512"), ("wycheproof", "generator-sha2")),
}


def build() -> dict[str, str]:
    files: dict[str, str] = {}
    for name, (make, sources) in FAMILIES.items():
        body = make()
        doc = {
            "about": "ESP known-answer vectors for oe_router.offload.kat, in the layout of "
            "offload/engine.py (hex; seq_hi null without ESN). Generated by "
            "scripts/make_kat_vectors.py: do not edit.",
            "sources": {s: SOURCES[s] for s in sources},
            **body,
        }
        files[name] = json.dumps(doc, indent=0, separators=(",", ":")) + "\n"
    files["LICENSE-wycheproof"] = (WYCHEPROOF / "LICENSE").read_text()
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the files would change")
    args = ap.parse_args()
    files = build()
    stale = [n for n, text in files.items() if not (OUT / n).exists()
             or (OUT / n).read_text() != text]  # fmt: skip
    if args.check:
        for n in stale:
            print(f"{OUT / n} is out of date: run scripts/make_kat_vectors.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for n, text in files.items():
        (OUT / n).write_text(text)
        if n.endswith(".json"):
            doc = json.loads(text)
            print(f"{n}: {len(doc['vectors'])} vectors, "
                  f"{len(doc['modified_tags'])} tag patterns, {len(text)} bytes")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
