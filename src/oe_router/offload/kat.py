"""Known-answer tests: an engine proves each ESP transform before it carries a packet.

Why whole-ESP vectors: a driver can be a correct AES and still be wrong for ESP (a
salt in the wrong place, the AAD without the ESN high bits, an ICV not checked). So
every vector is in the layout of ``engine.py`` (hdr, seq_hi, IV, plaintext, sealed),
and every valid one is also turned into forgeries (a flipped bit in the ciphertext, the
ICV, the SPI, the sequence number, the ESN high bits, or Wycheproof's modified-tag
patterns) that must raise ``AuthenticationFailed`` and never return a plaintext.

The vectors live in ``vectors/*.json`` (made by scripts/make_kat_vectors.py, sources
and licences inside) and are read from disk on each call: the daemon holds none of
them between runs. ``quick=True`` is one valid vector (an ESN one when there is) and
one forgery: the start-up check and the runtime canary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from oe_router.records import record

from .engine import (
    AuthenticationFailed,
    Engine,
    EspCipher,
    OpenRequest,
    SealRequest,
    Transform,
)

__all__ = ["KatResult", "run_kat", "vector_file"]

# Vector file per kernel AEAD name (the family a transform belongs to).
_FILES = {
    "rfc4106(gcm(aes))": "esp_aes_gcm.json",
    "rfc7539esp(chacha20,poly1305)": "esp_chacha20_poly1305.json",
    "authenc(hmac(sha256),cbc(aes))": "esp_aes_cbc_hmac_sha256.json",
    "authenc(hmac(sha384),cbc(aes))": "esp_aes_cbc_hmac_sha384.json",
    "authenc(hmac(sha512),cbc(aes))": "esp_aes_cbc_hmac_sha512.json",
}


@record(frozen=True)
class KatResult:
    """The verdict on one engine and transform: passed only with cases run and no failure.

    Each failure names the vector and what went wrong, e.g. "RFC 7634 Appendix A: seal:
    differs from byte 88 (the ICV)".
    """

    engine: str
    transform: str
    driver: str
    passed: bool
    cases: int
    failures: tuple[str, ...]


@record(frozen=True)
class _Vector:
    id: str
    encr_key: bytes
    integ_key: bytes
    hdr: bytes
    seq_hi: int | None
    iv: bytes
    plaintext: bytes
    sealed: bytes

    @classmethod
    def parse(cls, d: dict[str, Any]) -> _Vector:
        h = bytes.fromhex
        return cls(
            d["id"],
            h(d["encr_key"]),
            h(d["integ_key"]),
            h(d["hdr"]),
            d["seq_hi"],
            h(d["iv"]),
            h(d["plaintext"]),
            h(d["sealed"]),
        )


def vector_file(transform: Transform) -> str:
    """The packaged file holding ``transform``'s vectors (by its kernel AEAD name)."""
    return _FILES.get(transform.aead, "")


def _load(transform: Transform) -> tuple[list[_Vector], list[tuple[str, bytes]]]:
    """The transform's vectors and the modified-tag patterns (id and comment, XOR)."""
    name = vector_file(transform)
    if not name:
        raise ValueError(f"no known-answer vectors for {transform.aead}")
    # a plain file next to this module: importlib.resources would import tempfile, shutil,
    # bz2, lzma ... for the daemon's life (docs/footprint.md); the package is never zipped
    text = (Path(__file__).parent / "vectors" / name).read_text("utf-8")
    doc = json.loads(text)
    vectors = [_Vector.parse(v) for v in doc["vectors"] if v["transform"] == transform.name]
    patterns = [
        (f"{m['id']} ({m['comment'] or 'modified tag'}) as an XOR", bytes.fromhex(m["xor"]))
        for m in doc["modified_tags"]
    ]
    return vectors, patterns


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def _forgeries(v: _Vector, icv_len: int) -> Iterator[tuple[str, bytes, int | None, bytes]]:
    """(what, hdr, seq_hi, sealed) for packets the engine must refuse."""
    yield "flipped ICV bit", v.hdr, v.seq_hi, _flip(v.sealed, len(v.sealed) - 1, 7)
    if len(v.sealed) > icv_len:
        yield "flipped ciphertext bit", v.hdr, v.seq_hi, _flip(v.sealed, 0)
    yield "flipped SPI bit (AAD)", _flip(v.hdr, 0, 3), v.seq_hi, v.sealed
    yield "flipped sequence number bit (AAD)", _flip(v.hdr, 7), v.seq_hi, v.sealed
    if v.seq_hi is None:
        yield "ESN high bits 0 added", v.hdr, 0, v.sealed
    else:
        yield "flipped ESN high bit", v.hdr, v.seq_hi ^ 0x80000000, v.sealed
        yield "ESN high bits dropped", v.hdr, None, v.sealed


def _where(got: bytes, want: bytes, ct_len: int) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes instead of {len(want)}"
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    part = "the ICV" if first >= ct_len else "the ciphertext"
    return f"differs from byte {first} ({part})"


class _Run:
    """Counts cases and collects failures; an engine's exception is a failure, not a crash."""

    def __init__(self) -> None:
        self.cases = 0
        self.failures: list[str] = []

    def check(self, vid: str, what: str, fn: Callable[[], str | None]) -> None:
        self.cases += 1
        try:
            problem = fn()
        except Exception as exc:
            problem = f"raised {type(exc).__name__}: {exc}"
        if problem:
            self.failures.append(f"{vid}: {what}: {problem}")


def _expect_refused(
    c: EspCipher, v: _Vector, hdr: bytes, seq_hi: int | None, sealed: bytes
) -> Callable[[], str | None]:
    def run() -> str | None:
        try:
            c.open(hdr, seq_hi, v.iv, sealed)
        except AuthenticationFailed:
            return None
        return "accepted a forged packet and returned a plaintext (the ICV is not checked)"

    return run


def _check_vector(
    run: _Run,
    c: EspCipher,
    v: _Vector,
    t: Transform,
    *,
    quick: bool,
    patterns: list[tuple[str, bytes]],
) -> None:
    ct_len = len(v.sealed) - t.icv_len

    def seal() -> str | None:
        got = c.seal(v.hdr, v.seq_hi, v.iv, v.plaintext)
        return None if got == v.sealed else _where(got, v.sealed, ct_len)

    def open_() -> str | None:
        try:
            got = c.open(v.hdr, v.seq_hi, v.iv, v.sealed)
        except AuthenticationFailed as exc:
            return f"refused the valid packet ({exc})"
        return None if got == v.plaintext else "the plaintext is not the expected one"

    run.check(v.id, "seal", seal)
    run.check(v.id, "open", open_)
    for what, hdr, seq_hi, sealed in _forgeries(v, t.icv_len):
        run.check(v.id, f"forgery ({what})", _expect_refused(c, v, hdr, seq_hi, sealed))
        if quick:
            return
    if patterns:
        for pid, xor in patterns:
            icv = bytes(a ^ b for a, b in zip(v.sealed[ct_len:], xor, strict=False))
            forged = v.sealed[:ct_len] + icv
            run.check(v.id, f"forgery ({pid})", _expect_refused(c, v, v.hdr, v.seq_hi, forged))

    def batched() -> str | None:
        sealed = c.seal_many([SealRequest(v.hdr, v.seq_hi, v.iv, v.plaintext)])
        if sealed != [v.sealed]:
            return "seal_many differs from the expected"
        forged = _flip(v.sealed, len(v.sealed) - 1)
        opened = c.open_many(
            [
                OpenRequest(v.hdr, v.seq_hi, v.iv, v.sealed),
                OpenRequest(v.hdr, v.seq_hi, v.iv, forged),
            ]
        )
        if opened != [v.plaintext, None]:
            return "open_many did not give [plaintext, None] for [valid, forged]"
        return None

    run.check(v.id, "batched", batched)


def run_kat(engine: Engine, transform: Transform, *, quick: bool = False) -> KatResult:
    """Run the known answers of ``transform`` on ``engine``; never raises for the engine.

    Full: every vector sealed, opened, batched and forged (the Wycheproof tag patterns on
    the first vector). Quick: one vector, ESN when there is one, and one forgery.
    """
    try:
        driver = engine.driver(transform)
    except Exception as exc:
        driver = f"? ({type(exc).__name__}: {exc})"
    run = _Run()
    try:
        vectors, patterns = _load(transform)
    except Exception as exc:
        run.failures.append(f"vectors for {transform.name}: cannot load: {exc}")
        vectors, patterns = [], []
    if quick and vectors:
        vectors = [next((v for v in vectors if v.seq_hi is not None), vectors[0])]
    for i, v in enumerate(vectors):
        try:
            c = engine.cipher(transform, v.encr_key, v.integ_key)
        except Exception as exc:
            run.cases += 1
            run.failures.append(f"{v.id}: cipher(): raised {type(exc).__name__}: {exc}")
            continue
        try:
            _check_vector(run, c, v, transform, quick=quick, patterns=patterns if i == 0 else [])
        finally:
            try:
                c.close()
            except Exception as exc:
                run.failures.append(f"{v.id}: close(): raised {type(exc).__name__}: {exc}")
    if not run.cases and not run.failures:
        run.failures.append(f"no known-answer vectors for {transform.name}")
    return KatResult(
        engine=engine.name,
        transform=transform.name,
        driver=driver,
        passed=run.cases > 0 and not run.failures,
        cases=run.cases,
        failures=tuple(run.failures),
    )
