"""The router's own IKE key: made on first start when its identity needs one.

Why: a router whose ``identity.local_id`` names it (``@router.example.org``) proves
that name with a key whose IPSECKEY it publishes. Asking every user to make one with
openssl first is a step most would get wrong (a world-readable key, a curve the peers
do not take), so the daemon makes it: ECDSA P-256 (IPSECKEY algorithm 3, what
strongSwan and libreswan take), written whole with mode 0600 and never over a file
that is there. The log gets the public half in the form to publish, never the key.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from oe_router.atomic import write_atomic
from oe_router.dns.ipseckey import PublicKey, rdata_text

__all__ = ["KEY_MODE", "generate_key_file", "publish_line"]

#: Only the daemon (root) may read its key.
KEY_MODE = 0o600


def generate_key_file(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key in ``path`` (PKCS#8 PEM, mode 0600, written atomically).

    FileExistsError if ``path`` exists by the time it is written (the caller then loads
    that one); other OSErrors as the file system gives them.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    write_atomic(path, pem, KEY_MODE, exclusive=True)
    return key


def publish_line(local_id: str, key: PublicKey) -> str:
    """The record that lets peers authenticate ``local_id``:
    ``router.example.org. IN IPSECKEY 10 0 3 . <base64>`` (an IP identity: its reverse name)."""
    name = local_id[1:] if local_id.startswith("@") else local_id
    try:
        owner = ipaddress.ip_address(name).reverse_pointer + "."
    except ValueError:
        owner = name.rstrip(".") + "."
    return f"{owner} IN IPSECKEY {rdata_text(key)}"
