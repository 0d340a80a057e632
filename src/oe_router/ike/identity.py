"""Who the IKE service says it is: the local identity and its private key.

Why apart from the service: the key comes from a file named by the config, made on
first use when the identity needs one (``hostkey``), or given up front (tests, tools);
a reload that names a missing key must leave the old one in place. The service asks
for the key and the identity text; ``oe status`` for what to publish.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_router.config.schema import OeConfig
from oe_router.dns.ipseckey import rdata_text

from .auth import PrivateKey, PublicKey
from .constants import IdType
from .errors import IkeError
from .hostkey import generate_key_file, publish_line
from .status_view import key_kind

__all__ = ["LocalIdentity", "load_private_key", "load_public_key", "parse_identity"]

log = logging.getLogger("oe_router.ike")


def load_private_key(pem: bytes, what: str) -> PrivateKey:
    """A PEM private key of a kind IKE can sign with; ValueError names ``what``."""
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a usable PEM private key ({exc})") from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(
            f"{what}: {type(key).__name__} keys are not supported (RSA, ECDSA, Ed25519)"
        )
    return key


def load_public_key(pem: bytes, what: str) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo); ValueError names ``what``."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(
            f"{what}: {type(key).__name__} keys are not supported (RSA, ECDSA, Ed25519)"
        )
    return key


def parse_identity(text: str, address: str) -> tuple[int, bytes]:
    """``%null``, ``@fqdn`` or an IP address -> (ID type, data); ``%address`` uses ``address``."""
    if text == "%null":
        return IdType.ID_NULL, b""
    if text.startswith("@") and len(text) > 1:
        return IdType.ID_FQDN, text[1:].encode("idna")
    ip = ipaddress.ip_address(address if text == "%address" else text)
    return (IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR), ip.packed


class LocalIdentity:
    """Our identity (``local_id``) and private key, from the config unless given.

    ``key_note`` says where the key came from, or why there is none.
    """

    def __init__(self, private_key: PrivateKey | None, local_id: str | None) -> None:
        self._key_override = private_key
        self._id_override = local_id
        self.private_key: PrivateKey | None = private_key
        self.key_note = ""

    def local_id(self, config: OeConfig) -> str:
        """The identity text we use (``%null``, ``@fqdn``, ``%address`` or an address)."""
        return self._id_override or config.identity.local_id

    def load(self, config: OeConfig) -> None:
        """Take the key ``config`` names (made when the identity needs one and the file
        does not exist); IkeError when an identity other than %null has no key."""
        if self._key_override is not None:
            self.private_key, self.key_note = self._key_override, "given"
            return
        path = Path(config.identity.private_key)
        local_id = config.identity.local_id
        try:
            if local_id != "%null" and not path.exists():
                self.private_key = self._first_key(path, local_id)
            else:
                self.private_key = load_private_key(path.read_bytes(), str(path))
            self.key_note = str(path)
        except OSError as exc:
            self.private_key = None
            self.key_note = f"{path}: {exc.strerror}"
            if config.identity.local_id != "%null":
                raise IkeError(
                    f"identity.private_key {path}: {exc.strerror}; local_id "
                    f"{config.identity.local_id} needs a key (or set local_id %null)"
                ) from None

    @staticmethod
    def _first_key(path: Path, local_id: str) -> PrivateKey:
        """The identity needs a key and there is none yet: make it (hostkey.py)."""
        try:
            key = generate_key_file(path)
        except FileExistsError:  # made meanwhile: take that one
            return load_private_key(path.read_bytes(), str(path))
        log.info(
            "identity %s: no key at %s, made one (ECDSA P-256, mode 0600); publish: %s",
            local_id,
            path,
            publish_line(local_id, key.public_key()),
        )
        return key

    def status(self, config: OeConfig) -> dict[str, object]:
        """Who we say we are, and the public half of our key in the IPSECKEY form to
        publish for that identity (``oe status`` "ike" -> "identity")."""
        out: dict[str, object] = {"local_id": self.local_id(config)}
        if self.private_key is not None:
            out["key"] = f"{key_kind(self.private_key)} {self.key_note}"
            with contextlib.suppress(ValueError):
                out["ipseckey"] = rdata_text(self.private_key.public_key())
        return out
