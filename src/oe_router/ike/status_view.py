"""How the IKE service's SAs read in ``oe status`` and in log lines.

Why apart from the service: what a row says (transforms by name, identities, selectors
as networks, times left) is presentation; the service only hands over its table, and
the same text helpers serve the daemon's tunnel events and the service's log lines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_router.control.status import ChildSaStatus, ProposalOffers, TunnelStatus

from .auth import PrivateKey, PublicKey
from .child import ChildSaInfo
from .constants import AuthMethod, DhId, EncrId, IdType, IntegId, PrfId
from .payloads import TrafficSelector
from .proposals import ProposalMismatch
from .states import IkeState

if TYPE_CHECKING:
    from .peers import Mismatch, PeerSa

__all__ = [
    "auth_text",
    "identity_text",
    "key_kind",
    "mismatch_rows",
    "offers_status",
    "ts_text",
    "tunnel_rows",
]


def offers_status(m: ProposalMismatch) -> ProposalOffers:
    """A proposal mismatch as the status model shows it."""
    return ProposalOffers(m.protocol, m.refused_by, m.ours, m.theirs)


def mismatch_rows(mismatches: Iterable[Mismatch], now: float) -> list[dict[str, object]]:
    """``oe status`` "ike" -> "proposal_mismatches": the latest NO_PROPOSAL_CHOSEN per
    peer, protocol and side, newest first, with its age."""
    rows: list[dict[str, object]] = []
    for m in sorted(mismatches, key=lambda m: m.at, reverse=True):
        o = m.offers
        rows.append(
            {
                "peer": m.peer,
                "age_s": round(now - m.at, 3),
                "protocol": o.protocol,
                "refused_by": o.refused_by,
                "ours": list(o.ours),
                "theirs": None if o.theirs is None else list(o.theirs),
            }
        )
    return rows


def identity_text(ident: tuple[int, bytes]) -> str:
    t, data = ident
    if t == IdType.ID_NULL:
        return "%null"
    if t in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        return ("@" if t == IdType.ID_FQDN else "") + data.decode("ascii", "replace")
    if t in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(data) in (4, 16):
        return str(ipaddress.ip_address(data))
    return f"{IdType(t).name if t in IdType._value2member_map_ else t}:{data.hex()}"


def key_kind(key: PrivateKey | PublicKey | None) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA-P256", "secp384r1": "ECDSA-P384"}.get(
            key.curve.name, f"ECDSA-{key.curve.name}"
        )
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return ""


def auth_text(method: int, key: PrivateKey | PublicKey | None) -> str:
    if method == AuthMethod.NULL:
        return "null"
    name = AuthMethod(method).name if method in AuthMethod._value2member_map_ else str(method)
    kind = key_kind(key)
    return f"{name.lower()}({kind})" if kind else name.lower()


def _name(enum: Any, value: int | None) -> str:
    if value is None:
        return ""
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


def _encr_text(encr: int, bits: int | None) -> str:
    return _name(EncrId, encr) + (f"_{bits}" if bits else "")


def ts_text(ts: Iterable[TrafficSelector]) -> str:
    out = []
    for t in ts:
        nets = ipaddress.summarize_address_range(t.start, t.end)
        text = ",".join(str(n) for n in nets)
        if t.ip_protocol:
            text += f"[{t.ip_protocol}"
            if (t.start_port, t.end_port) != (0, 65535):
                text += f"/{t.start_port}" + (
                    f"-{t.end_port}" if t.end_port != t.start_port else ""
                )
            text += "]"
        out.append(text)
    return " ".join(out)


def _until(info: ChildSaInfo | None, now: float) -> float | None:
    return None if info is None or info.rekey_at is None else round(info.rekey_at - now, 3)


def tunnel_rows(sas: Iterable[PeerSa], now: float, natt_port: int) -> tuple[TunnelStatus, ...]:
    """One status row per IKE SA, Child SAs nested (``oe status``)."""
    out = []
    for p in sas:
        h, ev = p.handle, p.ike
        since = h.established_at
        age = None if since is None else round(now - since, 3)
        at = h.sa.ike_rekey_at if h.sa.state == IkeState.ESTABLISHED else None
        rekey = None if at is None else round(at - now, 3)
        infos = {c.spi_in: c for c in h.sa.child_sas()}
        transform = ""
        nat = ""
        local_id = remote_id = local_auth = remote_auth = ""
        if ev is not None:
            transform = "/".join(
                x
                for x in (
                    _encr_text(ev.encr, ev.encr_key_bits),
                    _name(IntegId, ev.integ),
                    _name(PrfId, ev.prf),
                    _name(DhId, ev.dh_group),
                )
                if x
            )
            nat = ",".join(
                n for n, on in (("local", ev.nat_local), ("remote", ev.nat_remote)) if on
            )
            local_id, remote_id = identity_text(ev.local_id), identity_text(ev.peer_id)
            local_auth = auth_text(ev.local_auth_method, p.local_key)
            remote_auth = auth_text(ev.peer_auth_method, p.peer_key)
        children = tuple(
            ChildSaStatus(
                spi_in=c.event.spi_in.hex(),
                spi_out=c.event.spi_out.hex(),
                mode=c.event.mode,
                transform="/".join(
                    x
                    for x in (
                        _encr_text(c.event.encr, c.event.encr_key_bits),
                        _name(IntegId, c.event.integ),
                        "ESN" if c.event.esn else "",
                    )
                    if x
                ),
                ts_local=ts_text(c.event.ts_local),
                ts_remote=ts_text(c.event.ts_remote),
                udp_encap=c.event.udp_encap,
                established_s=round(now - c.since, 3),
                rekey_in_s=_until(infos.get(c.event.spi_in), now),
            )
            for c in p.children.values()
        )
        out.append(
            TunnelStatus(
                peer=p.peer,
                local=f"{h.local[0]}[{h.local[1] if not h.natt else natt_port}]",
                remote=f"{h.remote[0]}[{h.remote[1]}]",
                state=p.state,
                transform=transform,
                established_s=age,
                source="ike",
                role="initiator" if h.sa.is_initiator else "responder",
                local_id=local_id,
                remote_id=remote_id,
                local_auth=local_auth,
                remote_auth=remote_auth,
                ike_spis=f"{h.sa.spi_i.hex()}_i {h.sa.spi_r.hex()}_r",
                nat=nat,
                rekey_in_s=rekey,
                children=children,
            )
        )
    return tuple(out)
