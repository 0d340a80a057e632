"""SA payload negotiation: which IKE and ESP transform sets we offer and accept.

Why apart from the state machine: the same choice rules serve IKE_SA_INIT,
IKE_AUTH and every CREATE_CHILD_SA (new Child SA, Child rekey with PFS, IKE
rekey), in both roles; they are pure functions of the proposals.
"""

from __future__ import annotations

import functools

from oe_router.records import record

from .constants import DhId, EncrId, EsnId, IntegId, NotifyType, PrfId, ProtocolId, TransformType
from .crypto import SUPPORTED_DH_GROUPS
from .errors import IkeProtocolError
from .payloads import Proposal, Transform


@record(frozen=True)
class IkeProposalSpec:
    """One IKE SA transform set we accept; ``integ`` None for AEAD ciphers."""

    encr: int
    key_bits: int | None
    prf: int
    integ: int | None
    dh_groups: tuple[int, ...]


@record(frozen=True)
class EspProposalSpec:
    """One ESP transform set we accept, in the order the offload layer prefers."""

    encr: int
    key_bits: int | None
    integ: int | None
    esn: tuple[int, ...] = (EsnId.NO_ESN,)


_GROUPS = (DhId.CURVE25519, DhId.ECP_256, DhId.MODP_2048)

DEFAULT_IKE_PROPOSALS: tuple[IkeProposalSpec, ...] = (
    IkeProposalSpec(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.CHACHA20_POLY1305, None, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.AES_GCM_16, 128, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, _GROUPS),
    IkeProposalSpec(EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_512, IntegId.HMAC_SHA2_512_256, _GROUPS),
)

DEFAULT_ESP_PROPOSALS: tuple[EspProposalSpec, ...] = (
    EspProposalSpec(EncrId.AES_GCM_16, 256, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_GCM_16, 128, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.CHACHA20_POLY1305, None, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_384_192, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_512_256, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_384_192, (EsnId.NO_ESN, EsnId.ESN)),
)


_BOTH_ESN = (EsnId.NO_ESN, EsnId.ESN)

#: strongSwan ESP keywords (``oe.ike.esp_proposal``, the offload layer's transform names)
#: -> what we offer for each, with and without ESN.
ESP_KEYWORDS: dict[str, EspProposalSpec] = {
    "aes256gcm16": EspProposalSpec(EncrId.AES_GCM_16, 256, None, _BOTH_ESN),
    "aes128gcm16": EspProposalSpec(EncrId.AES_GCM_16, 128, None, _BOTH_ESN),
    "chacha20poly1305": EspProposalSpec(EncrId.CHACHA20_POLY1305, None, None, _BOTH_ESN),
    "aes256-sha256": EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128, _BOTH_ESN),
    "aes128-sha256": EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, _BOTH_ESN),
    "aes256-sha512": EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256, _BOTH_ESN),
    "aes256-sha384": EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_384_192, _BOTH_ESN),
    "aes128-sha512": EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_512_256, _BOTH_ESN),
    "aes128-sha384": EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_384_192, _BOTH_ESN),
}


def esp_offer(names: tuple[str, ...]) -> tuple[EspProposalSpec, ...]:
    """The ESP proposals for keywords in order; unknown keywords are left out."""
    return tuple(ESP_KEYWORDS[n] for n in dict.fromkeys(names) if n in ESP_KEYWORDS)


# --------------------------------------------------------------------------- keywords

#: strongSwan's proposal keywords per transform (``{}`` takes the key length): how
#: ``oe status`` and the log say what each side offered when no proposal matched.
_ENCR_WORDS: dict[int, str] = {
    EncrId.TRIPLE_DES: "3des",
    EncrId.NULL: "null",
    EncrId.AES_CBC: "aes{}",
    EncrId.AES_CTR: "aes{}ctr",
    EncrId.AES_CCM_8: "aes{}ccm8",
    EncrId.AES_CCM_12: "aes{}ccm12",
    EncrId.AES_CCM_16: "aes{}ccm16",
    EncrId.AES_GCM_8: "aes{}gcm8",
    EncrId.AES_GCM_12: "aes{}gcm12",
    EncrId.AES_GCM_16: "aes{}gcm16",
    EncrId.NULL_AUTH_AES_GMAC: "aes{}gmac",
    EncrId.CHACHA20_POLY1305: "chacha20poly1305",
}
_WORDS: dict[int, dict[int, str]] = {
    TransformType.INTEG: {
        IntegId.HMAC_MD5_96: "md5",
        IntegId.HMAC_SHA1_96: "sha1",
        IntegId.AES_XCBC_96: "aesxcbc",
        IntegId.HMAC_SHA2_256_128: "sha256",
        IntegId.HMAC_SHA2_384_192: "sha384",
        IntegId.HMAC_SHA2_512_256: "sha512",
    },
    TransformType.PRF: {
        PrfId.HMAC_MD5: "prfmd5",
        PrfId.HMAC_SHA1: "prfsha1",
        PrfId.AES128_XCBC: "prfaesxcbc",
        PrfId.HMAC_SHA2_256: "prfsha256",
        PrfId.HMAC_SHA2_384: "prfsha384",
        PrfId.HMAC_SHA2_512: "prfsha512",
        PrfId.AES128_CMAC: "prfaescmac",
    },
    TransformType.DH: {
        DhId.MODP_1024: "modp1024",
        DhId.MODP_2048: "modp2048",
        DhId.MODP_3072: "modp3072",
        DhId.ECP_256: "ecp256",
        DhId.ECP_384: "ecp384",
        DhId.ECP_521: "ecp521",
        DhId.CURVE25519: "curve25519",
        DhId.CURVE448: "curve448",
    },
    TransformType.ESN: {EsnId.NO_ESN: "noesn", EsnId.ESN: "esn"},
}
_UNKNOWN: dict[int, str] = {
    TransformType.ENCR: "encr",
    TransformType.PRF: "prf",
    TransformType.INTEG: "integ",
    TransformType.DH: "dh",
    TransformType.ESN: "esn",
}
#: at most this many of a peer's proposals are told (anyone can send an IKE_SA_INIT)
MAX_TOLD = 12


def _word(t: Transform) -> str:
    if t.transform_type == TransformType.ENCR and t.transform_id in _ENCR_WORDS:
        return _ENCR_WORDS[t.transform_id].format(t.key_length or "")
    known = _WORDS.get(t.transform_type, {})
    if t.transform_id in known:
        return known[t.transform_id]
    return f"{_UNKNOWN.get(t.transform_type, f'type{t.transform_type}:')}{t.transform_id}"


def proposal_text(p: Proposal) -> str:
    """A proposal in strongSwan's keyword form (``aes256gcm16-prfsha256-ecp256``,
    ``aes256-sha512-noesn``): encryption, integrity, PRF, DH groups, ESN, in that order;
    INTEG NONE and DH NONE are left out, as strongSwan's own proposals leave them."""
    words = []
    for ttype in (
        TransformType.ENCR,
        TransformType.INTEG,
        TransformType.PRF,
        TransformType.DH,
        TransformType.ESN,
    ):
        for t in p.of_type(ttype):
            if ttype in (TransformType.INTEG, TransformType.DH) and t.transform_id == 0:
                continue
            words.append(_word(t))
    text = "-".join(dict.fromkeys(words)) or "empty"
    if p.protocol_id not in (ProtocolId.IKE, ProtocolId.ESP):
        text = f"protocol{p.protocol_id}:{text}"
    return text[:200]


def proposals_text(proposals: list[Proposal]) -> tuple[str, ...]:
    """Each proposal's keywords (``proposal_text``), at most ``MAX_TOLD`` of them."""
    out = tuple(proposal_text(p) for p in proposals[:MAX_TOLD])
    if len(proposals) > MAX_TOLD:
        out += (f"(and {len(proposals) - MAX_TOLD} more)",)
    return out


@record(frozen=True)
class ProposalMismatch:
    """What each side offered when no proposal matched (NO_PROPOSAL_CHOSEN).

    ``refused_by`` is ``peer`` (it refused ours; ``theirs`` is None, for a peer only
    says NO_PROPOSAL_CHOSEN) or ``us`` (we refused the peer's ``theirs``; ``ours`` is
    what we accept). ``protocol`` is ``IKE`` or ``ESP``. Proposals are keyword texts
    (``proposal_text``), so an admin can compare them with a peer's configuration.
    """

    protocol: str
    refused_by: str
    ours: tuple[str, ...]
    theirs: tuple[str, ...] | None = None

    @classmethod
    def peer_refused(cls, protocol: str, ours: list[Proposal]) -> ProposalMismatch:
        return cls(protocol, "peer", proposals_text(ours))

    @classmethod
    def we_refused(
        cls, protocol: str, theirs: list[Proposal], ours: list[Proposal]
    ) -> ProposalMismatch:
        return cls(protocol, "us", proposals_text(ours), proposals_text(theirs))

    def text(self) -> str:
        """One clause for a log line: both sides' offers, or ours and that theirs is unknown."""
        ours = ", ".join(self.ours) or "nothing"
        if self.theirs is None:
            return f"we offered {self.protocol} {ours}; the peer did not say what it accepts"
        theirs = ", ".join(self.theirs) or "nothing"
        return f"the peer offered {self.protocol} {theirs}; we accept {ours}"


def esp_accepted(specs: tuple[EspProposalSpec, ...]) -> list[Proposal]:
    """Our ESP specs as proposals (no PFS groups), for telling what we accept."""
    return esp_proposals(specs, b"\x00" * 4)


# --------------------------------------------------------------------------- IKE


@record(frozen=True)
class IkeChoice:
    """The transform set chosen for an IKE SA and its DH group."""

    spec: IkeProposalSpec
    dh: int

    def proposal(self, spi: bytes = b"") -> Proposal:
        """The single proposal a responder returns (with its new SPI on an IKE rekey)."""
        s = self.spec
        ts = [
            Transform.make(TransformType.ENCR, s.encr, s.key_bits),
            Transform.make(TransformType.PRF, s.prf),
        ]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts.append(Transform.make(TransformType.DH, self.dh))
        return Proposal(1, ProtocolId.IKE, spi, ts)


def encr_matches(t: Transform, encr: int, key_bits: int | None) -> bool:
    if t.transform_id != encr:
        return False
    kl = t.key_length
    if encr == EncrId.CHACHA20_POLY1305:
        return kl in (None, 256)
    return kl == key_bits


def ike_proposals(
    specs: tuple[IkeProposalSpec, ...], spi: bytes = b"", first_group: int | None = None
) -> list[Proposal]:
    """Our IKE proposals; ``first_group`` (the KE we send) is listed first in each."""
    out = []
    for n, s in enumerate(specs, start=1):
        ts = [
            Transform.make(TransformType.ENCR, s.encr, s.key_bits),
            Transform.make(TransformType.PRF, s.prf),
        ]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        groups = list(s.dh_groups)
        if first_group in groups:
            groups.remove(first_group)
            groups.insert(0, first_group)
        ts += [Transform.make(TransformType.DH, g) for g in groups]
        out.append(Proposal(n, ProtocolId.IKE, spi, ts))
    return out


def _match_ike(p: Proposal, s: IkeProposalSpec, ke_group: int | None) -> IkeChoice | None:
    if p.protocol_id != ProtocolId.IKE:
        return None
    if not any(encr_matches(t, s.encr, s.key_bits) for t in p.of_type(TransformType.ENCR)):
        return None
    if s.prf not in [t.transform_id for t in p.of_type(TransformType.PRF)]:
        return None
    integs = [t.transform_id for t in p.of_type(TransformType.INTEG)]
    if (s.integ is None and integs not in ([], [IntegId.NONE])) or (
        s.integ is not None and s.integ not in integs
    ):
        return None
    groups = [t.transform_id for t in p.of_type(TransformType.DH) if t.transform_id in s.dh_groups]
    if not groups:
        return None
    return _ike_choice(s, ke_group if ke_group in groups else groups[0])


@functools.lru_cache(maxsize=64)
def _ike_choice(spec: IkeProposalSpec, dh: int) -> IkeChoice:
    """One shared (frozen) ``IkeChoice`` per spec and group, not one per IKE SA."""
    return IkeChoice(spec, dh)


def select_ike_proposal(
    offered: list[Proposal], ours: tuple[IkeProposalSpec, ...], ke_group: int | None
) -> IkeChoice | None:
    """Responder's choice: the peer's first proposal that one of our specs accepts."""
    for p in offered:
        for s in ours:
            choice = _match_ike(p, s, ke_group)
            if choice is not None:
                return choice
    return None


# --------------------------------------------------------------------------- ESP


@record(frozen=True)
class EspChoice:
    """The ESP transform set chosen for one Child SA; ``dh`` set when it used PFS."""

    spec: EspProposalSpec
    esn: int
    peer_spi: bytes
    dh: int | None = None

    def proposal(self, number: int, our_spi: bytes) -> Proposal:
        s = self.spec
        ts = [Transform.make(TransformType.ENCR, s.encr, s.key_bits)]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        if self.dh is not None:
            ts.append(Transform.make(TransformType.DH, self.dh))
        ts.append(Transform.make(TransformType.ESN, self.esn))
        return Proposal(number, ProtocolId.ESP, our_spi, ts)


def esp_proposals(
    specs: tuple[EspProposalSpec, ...], spi: bytes, dh_groups: tuple[int, ...] = ()
) -> list[Proposal]:
    """Our ESP proposals; ``dh_groups`` non-empty asks for PFS (CREATE_CHILD_SA only)."""
    out = []
    for n, s in enumerate(specs, start=1):
        ts = [Transform.make(TransformType.ENCR, s.encr, s.key_bits)]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts += [Transform.make(TransformType.DH, g) for g in dh_groups]
        ts += [Transform.make(TransformType.ESN, e) for e in s.esn]
        out.append(Proposal(n, ProtocolId.ESP, spi, ts))
    return out


def select_child_proposal(
    offered: list[Proposal],
    ours: tuple[EspProposalSpec, ...],
    ke_group: int | None,
    dh_groups: tuple[int, ...] = SUPPORTED_DH_GROUPS,
) -> tuple[int, EspChoice] | None:
    """Choose ESP transforms; a proposal with DH transforms needs a KE (``ke_group``).

    Proposals without DH (or with DH NONE) give a Child SA without PFS. With
    DH, we take the KE's group when offered, else the first group we support
    (the caller then answers INVALID_KE_PAYLOAD).
    """
    for p in offered:
        if p.protocol_id != ProtocolId.ESP or len(p.spi) != 4:
            continue
        groups = [t.transform_id for t in p.of_type(TransformType.DH)]
        dh: int | None = None
        if groups and groups != [DhId.NONE]:
            usable = [g for g in groups if g in dh_groups]
            if not usable:
                continue
            dh = ke_group if ke_group in usable else usable[0]
        elif ke_group is not None:
            continue  # a KE without DH transforms is malformed for this proposal
        for s in ours:
            if not any(encr_matches(t, s.encr, s.key_bits) for t in p.of_type(TransformType.ENCR)):
                continue
            integs = [t.transform_id for t in p.of_type(TransformType.INTEG)]
            if s.integ is None and integs not in ([], [IntegId.NONE]):
                continue
            if s.integ is not None and s.integ not in integs:
                continue
            esns = [t.transform_id for t in p.of_type(TransformType.ESN)] or [EsnId.NO_ESN]
            esn = next((e for e in esns if e in s.esn), None)
            if esn is not None:
                return p.number, EspChoice(s, esn, p.spi, dh)
    return None


def select_esp_proposal(
    offered: list[Proposal], ours: tuple[EspProposalSpec, ...]
) -> tuple[int, EspChoice] | None:
    """Responder's choice of ESP transforms in IKE_AUTH (no PFS there)."""
    plain = [p for p in offered if not p.of_type(TransformType.DH)]
    return select_child_proposal(plain, ours, None, ())


def single(p: Proposal, ttype: int) -> Transform | None:
    """The one transform of ``ttype`` in a chosen proposal; more than one is an error."""
    found = p.of_type(ttype)
    if len(found) > 1:
        raise IkeProtocolError(
            NotifyType.NO_PROPOSAL_CHOSEN,
            f"chosen proposal has {len(found)} transforms of type {ttype}",
        )
    return found[0] if found else None


def esp_key_lengths(encr: int, key_bits: int | None, integ: int | None) -> tuple[int, int]:
    """(encryption key bytes incl. salt, integrity key bytes) for an ESP transform set."""
    if encr == EncrId.AES_GCM_16:
        e = (key_bits or 0) // 8 + 4
    elif encr == EncrId.CHACHA20_POLY1305:
        e = 36
    else:
        e = (key_bits or 0) // 8
    # RFC 4868 §2.1.1: the HMAC key is the hash's full output size
    sizes: dict[int | None, int] = {
        IntegId.HMAC_SHA2_256_128: 32,
        IntegId.HMAC_SHA2_384_192: 48,
        IntegId.HMAC_SHA2_512_256: 64,
    }
    a = sizes.get(integ, 0)
    return e, a


__all__ = [
    "DEFAULT_ESP_PROPOSALS",
    "DEFAULT_IKE_PROPOSALS",
    "ESP_KEYWORDS",
    "EspChoice",
    "EspProposalSpec",
    "IkeChoice",
    "IkeProposalSpec",
    "ProposalMismatch",
    "encr_matches",
    "esp_accepted",
    "esp_key_lengths",
    "esp_offer",
    "esp_proposals",
    "ike_proposals",
    "proposal_text",
    "proposals_text",
    "select_child_proposal",
    "select_esp_proposal",
    "select_ike_proposal",
    "single",
]
