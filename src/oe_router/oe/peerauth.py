"""How a peer must authenticate, as the OE layer sees it: NULL, or a key with its name.

Why OE's own type: the DNS layer's ``PeerKey`` carries what an IPSECKEY record said
(precedence, algorithm number, ignored gateway); OE needs only whether a key binds the
peer and, for the decision line, which name vouched for it. ``peer_auth`` turns the
DNS front's validated record into this at the OE edge, so oe/ never imports dns/'s
record type and dns/ never learns about OE.
"""

from __future__ import annotations

from typing import Protocol

import dns.name
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from oe_router.ike.auth import PublicKey
from oe_router.records import record

__all__ = ["PeerAuth", "PublishedKey", "peer_auth"]


@record(frozen=True)
class PeerAuth:
    """NULL auth (RFC 7619), or the DNSSEC-validated public key the peer must prove."""

    key: PublicKey | None = None  #: None: NULL auth
    name: dns.name.Name | None = None  #: the DNS name the key was published under

    @property
    def null(self) -> bool:
        """No key to prove: anonymous OE (no DNS key, or one of kind "none")."""
        return self.key is None

    @property
    def words(self) -> str:
        """How the peer proves who it is, for a decision line: ``NULL auth`` or
        ``ED25519 key from DNSSEC`` (the key's kind, never its bytes)."""
        if self.key is None:
            return "NULL auth"
        return f"{_kind(self.key)} key from DNSSEC"


class PublishedKey(Protocol):
    """What ``peer_auth`` reads of a validated IPSECKEY record (``dns.ipseckey.PeerKey``)."""

    @property
    def public_key(self) -> PublicKey | None:
        """None exactly when the record says "no key: I take NULL auth"."""
        ...


def peer_auth(record: PublishedKey, name: dns.name.Name) -> PeerAuth:
    """The DNS front's validated key for ``name`` as OE's peer auth."""
    return PeerAuth(record.public_key, name)


def _kind(key: PublicKey) -> str:
    """The key's kind as IPSECKEY names it (``RSA``, ``ECDSA_P256``, ``ED25519``)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ED25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA_P256" if isinstance(key.curve, ec.SECP256R1) else f"ECDSA_{key.curve.name}"
    return "RSA"  # the rest of PublicKey
