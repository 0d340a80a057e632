"""Guest-side source shared by the offload engines' QEMU tests (test_offload_afalg,
test_offload_cryptodev): each module's GUEST script, which runs inside the router VM
with the image's oe_router, starts with this text.

``seal_both`` is one case of the "byte-equal to the software engine" round trip: fresh
keys and a fresh packet of about ``n`` bytes (the module's own ``packet(t, n)`` pads it),
the two ciphers, and both seals, for the module to compare, open and tamper with.
"""

SEAL_BOTH = r'''
import secrets


def seal_both(e, sw, t, n, seq_hi, packet):
    """(engine cipher, software cipher, hdr, iv, pt, where, engine's seal, software's seal)."""
    ek, ik = secrets.token_bytes(t.encr_key_len), secrets.token_bytes(t.auth_key_len)
    hdr, iv, pt = packet(t, n)
    a, b = e.cipher(t, ek, ik), sw.cipher(t, ek, ik)
    where = f"{t.name} n={len(pt)} esn={seq_hi is not None}"
    return a, b, hdr, iv, pt, where, a.seal(hdr, seq_hi, iv, pt), b.seal(hdr, seq_hi, iv, pt)
'''
