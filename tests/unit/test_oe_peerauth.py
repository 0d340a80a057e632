"""OE's peer auth from the DNS front's validated IPSECKEY record (oe/peerauth.py)."""

from __future__ import annotations

import dns.name
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.ike.auth import PublicKey
from oe_router.oe.peerauth import PeerAuth, peer_auth

NAME = dns.name.from_text("host.example.test")


def test_a_record_of_kind_none_is_null_auth_under_its_name() -> None:
    auth = peer_auth(PeerKey(KeyKind.NONE, None, 10, NAME, 0), NAME)
    assert auth == PeerAuth(None, NAME)
    assert auth.null and auth.words == "NULL auth"
    assert PeerAuth().null and PeerAuth().name is None  # packet-triggered: no DNS name


@pytest.mark.parametrize(
    ("public", "kind", "words"),
    [
        (ed25519.Ed25519PrivateKey.generate().public_key(), KeyKind.ED25519, "ED25519"),
        (ec.generate_private_key(ec.SECP256R1()).public_key(), KeyKind.ECDSA_P256, "ECDSA_P256"),
        (rsa.generate_private_key(65537, 2048).public_key(), KeyKind.RSA, "RSA"),
    ],
)
def test_a_key_is_kept_with_its_name_and_named_by_kind(
    public: PublicKey, kind: KeyKind, words: str
) -> None:
    auth = peer_auth(PeerKey(kind, public, 10, NAME, 5), NAME)
    assert auth.key is public and auth.name == NAME and not auth.null
    assert auth.words == f"{words} key from DNSSEC"
    assert kind.value.upper() == words  # the same word the DNS side uses for the kind
