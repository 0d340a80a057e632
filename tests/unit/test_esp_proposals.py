"""ESP proposal choice with HMAC-SHA2-384-192 and HMAC-SHA2-512-256 (RFC 4868, issue 15).

Why: OpenIKED's default Child SA offer is AES-CBC with HMAC-SHA2-512/384 or SHA-1, no
ESN; ours had HMAC-SHA2-256 only, so nothing overlapped (NO_PROPOSAL_CHOSEN). These
check, on the SA payloads themselves, that the default offer now meets such a peer on
SHA-512 (never SHA-1), and that the key sizes IKE derives fit each integrity transform.
"""

from __future__ import annotations

import pytest

from oe_router.config.schema import DEFAULT_ESP_PROPOSALS
from oe_router.ike.constants import EncrId, EsnId, IntegId, ProtocolId, TransformType
from oe_router.ike.payloads import Proposal, Transform
from oe_router.ike.proposals import (
    ESP_KEYWORDS,
    esp_key_lengths,
    esp_offer,
    esp_proposals,
    select_esp_proposal,
)

SPI = b"\x0a\x0b\x0c\x0d"


def _offer(integs: tuple[int, ...], esn: tuple[int, ...] = (EsnId.NO_ESN,)) -> list[Proposal]:
    """One ESP proposal as OpenIKED sends its default: AES-CBC-256 and -128, the given
    integrity transforms in order, no ESN."""
    ts = [
        Transform.make(TransformType.ENCR, EncrId.AES_CBC, 256),
        Transform.make(TransformType.ENCR, EncrId.AES_CBC, 128),
        *(Transform.make(TransformType.INTEG, i) for i in integs),
        *(Transform.make(TransformType.ESN, e) for e in esn),
    ]
    return [Proposal(1, ProtocolId.ESP, SPI, ts)]


def test_the_default_offer_meets_an_openiked_style_peer_on_sha512() -> None:
    iked = _offer((IntegId.HMAC_SHA2_512_256, IntegId.HMAC_SHA2_384_192, IntegId.HMAC_SHA1_96))
    picked = select_esp_proposal(iked, esp_offer(DEFAULT_ESP_PROPOSALS))
    assert picked is not None
    number, choice = picked
    assert (number, choice.esn, choice.peer_spi) == (1, EsnId.NO_ESN, SPI)
    assert (choice.spec.encr, choice.spec.key_bits, choice.spec.integ) == (
        EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256,
    )  # fmt: skip
    # the single proposal we answer with carries exactly that, never SHA-1
    back = choice.proposal(1, b"\x01\x02\x03\x04")
    assert [t.transform_id for t in back.of_type(TransformType.INTEG)] == [14]


def test_sha1_alone_is_refused() -> None:
    assert (
        select_esp_proposal(_offer((IntegId.HMAC_SHA1_96,)), esp_offer(DEFAULT_ESP_PROPOSALS))
        is None
    )


def test_sha384_only_peer_gets_aes256_sha384() -> None:
    picked = select_esp_proposal(
        _offer((IntegId.HMAC_SHA2_384_192,)), esp_offer(DEFAULT_ESP_PROPOSALS)
    )
    assert picked is not None and picked[1].spec == ESP_KEYWORDS["aes256-sha384"]


def test_our_sa_payload_lists_sha2_384_512_after_sha256() -> None:
    (p1, *rest) = esp_proposals(esp_offer(DEFAULT_ESP_PROPOSALS), SPI)
    integs = [[t.transform_id for t in p.of_type(TransformType.INTEG)] for p in (p1, *rest)]
    flat = [i[0] if i else None for i in integs]
    assert flat[:3] == [None, None, None]  # GCM-256, GCM-128, ChaCha20-Poly1305 first
    assert flat[3:] == [12, 12, 14, 13, 14, 13]
    assert all(
        [t.transform_id for t in p.of_type(TransformType.ESN)] == [EsnId.NO_ESN, EsnId.ESN]
        for p in (p1, *rest)
    )


@pytest.mark.parametrize(
    ("integ", "key_bits", "want"),
    [
        (IntegId.HMAC_SHA2_256_128, 128, (16, 32)),
        (IntegId.HMAC_SHA2_384_192, 128, (16, 48)),
        (IntegId.HMAC_SHA2_384_192, 256, (32, 48)),
        (IntegId.HMAC_SHA2_512_256, 256, (32, 64)),
    ],
)
def test_child_sa_key_sizes_are_rfc4868s(integ: int, key_bits: int, want: tuple[int, int]) -> None:
    """RFC 4868 §2.1.1: the HMAC key is the hash's output size (SHA-384: 48 bytes; it was
    0 before, which would have keyed the SA with nothing)."""
    assert esp_key_lengths(EncrId.AES_CBC, key_bits, integ) == want
