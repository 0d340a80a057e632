"""The key of an IKE initiator's FQDN identity, from the DNS front's validator.

Why here: a responder that holds no key for a signing initiator looks up
``<fqdn> IPSECKEY`` (issue 15 item 3), and that lookup must obey exactly the rules
the DNS front obeys: the same ``KeyLookup`` (validator, trust anchors, cache,
failure memory for bogus answers), a key only from a SECURE answer. This adapter
asks the front's current lookup (``current``: it changes on reload and RFC 5011
anchor moves; None while there is no DNS front, i.e. no trust anchor) and answers
in the shape ``ike.peer_keys.PeerKeyLookup`` wants: (key or None, what was found).
It never raises: a name that is not one, or no anchor, is a refusal with its reason;
it writes no log line (the IKE edge writes the one line per outcome, with the reason).
"""

from __future__ import annotations

from collections.abc import Callable

import dns.exception
import dns.name

from oe_router.dns.hold import KeyLookup, KeyStatus
from oe_router.dns.ipseckey import PublicKey

__all__ = ["IdentityKeys"]

NO_ANCHOR = "no DNSSEC trust anchor configured (oe.dns.trust_anchor / auto_trust_anchor)"


class IdentityKeys:
    """``await keys(name)``: the DNSSEC-validated IPSECKEY public key of ``name``."""

    def __init__(self, current: Callable[[], KeyLookup | None]) -> None:
        self._current = current

    async def __call__(self, name: str) -> tuple[PublicKey | None, str]:
        lookup = self._current()
        if lookup is None:
            return None, NO_ANCHOR
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            return None, f"{name!r} is not a DNS name ({exc})"
        result = await lookup.lookup(qname)  # remembered results come back at once
        if result.status is not KeyStatus.SECURE:
            return None, f"IPSECKEY of {qname} is {result.status.value}: {result.reason}"
        record = result.usable_key
        if record is None:
            return None, f"no IPSECKEY at {qname} ({result.reason})"
        if record.public_key is None:
            return None, f"the IPSECKEY at {qname} asks for NULL auth, not a signature"
        return record.public_key, f"IPSECKEY of {qname}, DNSSEC secure"
