"""The status model: what `oe status` shows and the control socket serves.

Every running service contributes a `StatusContribution`; the daemon merges
them with its own `DaemonStatus` into one `Status`. The JSON shape is a
contract for the CLI, LuCI and tests, so it is built in one place
(`Status.to_json`) and read back in one place (`Status.from_json`).
"""

from __future__ import annotations

from dataclasses import asdict, field, fields
from typing import Any

from oe_router.records import record

JsonObject = dict[str, Any]


def _known(cls: type, obj: JsonObject) -> JsonObject:
    """``obj`` without keys ``cls`` has no field for: a newer daemon's document stays
    readable by an older reader (fields only ever get added, with defaults)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


@record(frozen=True)
class ChildSaStatus:
    """One Child SA (an ESP SA pair) of an IKE SA, as the IKE layer negotiated it."""

    spi_in: str
    spi_out: str
    mode: str
    transform: str
    ts_local: str
    ts_remote: str
    udp_encap: bool = False
    established_s: float | None = None
    rekey_in_s: float | None = None


@record(frozen=True)
class TunnelStatus:
    """One IPsec tunnel (an IKE SA with its child SAs) as the OE manager sees it.

    Rows the IKE layer contributes have ``source == "ike"`` and fill the IKE fields
    (identities, auth methods, SPIs, NAT, rekey time and the Child SAs).

    ``bytes_in``/``bytes_out``/``packets_in``/``packets_out`` (OE manager rows): what the
    datapath counted on the Child SA's inbound and outbound ESP SA (the kernel counts the
    inner packets' bytes), read when the status is asked; a rekey starts them again at 0
    with the new SAs.
    """

    peer: str
    local: str
    remote: str
    state: str
    policy: str = ""
    transform: str = ""
    established_s: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    source: str = ""
    role: str = ""
    local_id: str = ""
    remote_id: str = ""
    local_auth: str = ""
    remote_auth: str = ""
    ike_spis: str = ""
    nat: str = ""
    rekey_in_s: float | None = None
    children: tuple[ChildSaStatus, ...] = ()
    #: The crypto engine the datapath runs this tunnel's ESP on ("" if not known or the
    #: kernel's own XFRM, which `oe status` shows as "-").
    engine: str = ""
    #: Inbound packets the datapath refused: replayed (or left of the window), and
    #: those whose ICV did not verify (forged or corrupted on the way).
    replay_errors: int = 0
    integrity_failures: int = 0

    @classmethod
    def from_json(cls, obj: JsonObject) -> TunnelStatus:
        kw = _known(cls, obj)
        kw["children"] = tuple(
            ChildSaStatus(**_known(ChildSaStatus, c)) for c in kw.get("children", ())
        )
        return cls(**kw)


@record(frozen=True)
class ProposalOffers:
    """What each side offered when no proposal matched (NO_PROPOSAL_CHOSEN).

    ``protocol`` is ``IKE`` or ``ESP``; ``refused_by`` ``peer`` (it refused ``ours``;
    ``theirs`` is None: a peer does not say what it accepts) or ``us`` (we refused
    ``theirs``; ``ours`` is what we accept). Each proposal is in strongSwan's keyword
    form (``aes256gcm16-prfsha256-ecp256``, ``aes256-sha512-noesn``).
    """

    protocol: str
    refused_by: str
    ours: tuple[str, ...] = ()
    theirs: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, obj: JsonObject) -> ProposalOffers:
        kw = _known(cls, obj)
        kw["ours"] = tuple(str(p) for p in kw.get("ours", ()))
        theirs = kw.get("theirs")
        kw["theirs"] = None if theirs is None else tuple(str(p) for p in theirs)
        return cls(**kw)


@record(frozen=True)
class ShuntStatus:
    """A pass/hold/drop shunt installed for a destination without a tunnel.

    ``offers``: the negotiation failed with NO_PROPOSAL_CHOSEN; what each side offered.
    """

    destination: str
    kind: str
    reason: str = ""
    expires_s: float | None = None
    offers: ProposalOffers | None = None

    @classmethod
    def from_json(cls, obj: JsonObject) -> ShuntStatus:
        kw = _known(cls, obj)
        offers = kw.get("offers")
        kw["offers"] = None if offers is None else ProposalOffers.from_json(offers)
        return cls(**kw)


@record(frozen=True)
class EngineRate:
    """One measured point: Mbit/s (inner bytes) and ns per packet at ``size`` bytes."""

    size: int
    mbit_s: float
    ns_per_packet: float


@record(frozen=True)
class EngineTransformStatus:
    """One transform on one engine: the driver, the known-answer verdict, the numbers.

    ``kat`` is ``passed``, ``failed`` (``reason`` says why: a KAT case, the canary, the
    datapath's report), ``pending``, or ``unsupported`` (the engine does not run it here;
    ``reason`` says why); ``in_use_for`` the packet sizes the chooser gives
    this engine for this transform (``all``, ``<=511``, ``>=512``; "" when none).
    """

    transform: str
    driver: str = ""
    kat: str = "pending"
    reason: str = ""
    rates: tuple[EngineRate, ...] = ()
    in_use_for: str = ""

    @classmethod
    def from_json(cls, obj: JsonObject) -> EngineTransformStatus:
        kw = _known(cls, obj)
        kw["rates"] = tuple(EngineRate(**_known(EngineRate, r)) for r in kw.get("rates", ()))
        return cls(**kw)


@record(frozen=True)
class EngineStatus:
    """A crypto engine found by `offload`: what it is, what it proved, how fast, its use.

    The first six fields are the summary (``driver`` lists the engine's drivers,
    ``kind`` is ``cpu`` or ``hardware``, ``proven``: some transform passed its KAT,
    ``selected``: the chooser uses it, ``mbit_s``: its best 1400-byte figure). ``state``
    is ``proving``, ``measuring``, ``ready``, ``failed`` (``reason`` says why the engine
    as a whole cannot run) or ``gone``; ``transforms`` the detail per transform;
    ``in_use_for`` the ``transform@sizes`` it holds in the choice table.
    """

    name: str
    driver: str
    kind: str
    proven: bool = False
    selected: bool = False
    mbit_s: float | None = None
    hardware: bool = False
    state: str = ""
    reason: str = ""
    transforms: tuple[EngineTransformStatus, ...] = ()
    in_use_for: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: JsonObject) -> EngineStatus:
        kw = _known(cls, obj)
        kw["transforms"] = tuple(
            EngineTransformStatus.from_json(t) for t in kw.get("transforms", ())
        )
        kw["in_use_for"] = tuple(str(u) for u in kw.get("in_use_for", ()))
        return cls(**kw)


@record(frozen=True)
class TrustAnchorStatus:
    """One key of a managed trust point (RFC 5011): which key, its state and since when.

    ``state`` is ``start``, ``addpend`` (``until``: when its add hold-down ends),
    ``valid``, ``missing`` (both trusted), ``revoked`` or ``removed``; ``since`` and
    ``until`` are UTC times (``2026-12-06T06:25:15Z``); ``form`` is ``dnskey`` once the
    key was seen, ``ds`` for a seed not seen yet.
    """

    zone: str
    key_tag: int
    algorithm: int
    state: str
    since: str
    until: str = ""
    form: str = ""

    @classmethod
    def from_json(cls, obj: JsonObject) -> TrustAnchorStatus:
        return cls(**_known(cls, obj))


@record(frozen=True)
class ReloadResult:
    """Outcome of one reload attempt; `problems` are one-line messages naming the option."""

    accepted: bool
    generation: int
    problems: tuple[str, ...] = ()
    at_uptime_s: float = 0.0

    def to_json(self) -> JsonObject:
        return {
            "accepted": self.accepted,
            "generation": self.generation,
            "problems": list(self.problems),
            "at_uptime_s": round(self.at_uptime_s, 3),
        }

    @classmethod
    def from_json(cls, obj: JsonObject) -> ReloadResult:
        return cls(
            accepted=bool(obj["accepted"]),
            generation=int(obj["generation"]),
            problems=tuple(str(p) for p in obj.get("problems", [])),
            at_uptime_s=float(obj.get("at_uptime_s", 0.0)),
        )


@record(frozen=True)
class DaemonStatus:
    """The daemon's own facts: who it is and which config generation runs."""

    version: str
    pid: int
    uptime_s: float
    config_path: str
    config_generation: int
    enabled: bool
    datapath: str
    last_reload: ReloadResult | None = None
    services: tuple[str, ...] = ()
    datapath_stats: JsonObject = field(default_factory=dict)
    #: which networks, devices and addresses are in use (``Platform.network_status``)
    network: JsonObject = field(default_factory=dict)

    def to_json(self) -> JsonObject:
        return {
            "version": self.version,
            "pid": self.pid,
            "uptime_s": round(self.uptime_s, 3),
            "config_path": self.config_path,
            "config_generation": self.config_generation,
            "enabled": self.enabled,
            "datapath": self.datapath,
            "last_reload": None if self.last_reload is None else self.last_reload.to_json(),
            "services": list(self.services),
            "datapath_stats": dict(self.datapath_stats),
            "network": dict(self.network),
        }

    @classmethod
    def from_json(cls, obj: JsonObject) -> DaemonStatus:
        last = obj.get("last_reload")
        return cls(
            version=str(obj["version"]),
            pid=int(obj["pid"]),
            uptime_s=float(obj["uptime_s"]),
            config_path=str(obj["config_path"]),
            config_generation=int(obj["config_generation"]),
            enabled=bool(obj["enabled"]),
            datapath=str(obj["datapath"]),
            last_reload=None if last is None else ReloadResult.from_json(last),
            services=tuple(str(s) for s in obj.get("services", [])),
            datapath_stats=dict(obj.get("datapath_stats", {})),
            network=dict(obj.get("network", {})),
        )


@record(frozen=True)
class StatusContribution:
    """What one service adds to the status; `dns` and `ike` keys are merged into the
    `dns` and `ike` objects."""

    tunnels: tuple[TunnelStatus, ...] = ()
    shunts: tuple[ShuntStatus, ...] = ()
    engines: tuple[EngineStatus, ...] = ()
    dns: JsonObject = field(default_factory=dict)
    datapath: str | None = None
    #: the datapath's own counters (first packets queued, held, released; worker drops)
    datapath_stats: JsonObject = field(default_factory=dict)
    #: the IKE endpoint's counters (what it dropped and why; fragment bytes held now)
    ike: JsonObject = field(default_factory=dict)
    #: the DNS front's RFC 5011-managed trust anchors
    trust_anchors: tuple[TrustAnchorStatus, ...] = ()


@record(frozen=True)
class Status:
    """The whole status document: six component sections plus `daemon`."""

    daemon: DaemonStatus
    tunnels: tuple[TunnelStatus, ...] = ()
    shunts: tuple[ShuntStatus, ...] = ()
    engines: tuple[EngineStatus, ...] = ()
    dns: JsonObject = field(default_factory=dict)
    ike: JsonObject = field(default_factory=dict)
    trust_anchors: tuple[TrustAnchorStatus, ...] = ()

    @classmethod
    def merge(cls, daemon: DaemonStatus, parts: list[StatusContribution]) -> Status:
        """Combine the daemon facts with every service's contribution, in service order."""
        dns: JsonObject = {}
        ike: JsonObject = {}
        for part in parts:
            dns.update(part.dns)
            ike.update(part.ike)
        return cls(
            daemon=daemon,
            tunnels=tuple(t for p in parts for t in p.tunnels),
            shunts=tuple(s for p in parts for s in p.shunts),
            engines=tuple(e for p in parts for e in p.engines),
            dns=dns,
            ike=ike,
            trust_anchors=tuple(a for p in parts for a in p.trust_anchors),
        )

    def to_json(self) -> JsonObject:
        return {
            "daemon": self.daemon.to_json(),
            "tunnels": [asdict(t) for t in self.tunnels],
            "shunts": [asdict(s) for s in self.shunts],
            "engines": [e.to_json() for e in self.engines],
            "dns": dict(self.dns),
            "ike": dict(self.ike),
            "trust_anchors": [asdict(a) for a in self.trust_anchors],
        }

    @classmethod
    def from_json(cls, obj: JsonObject) -> Status:
        """Read a status document back; raises KeyError/TypeError/ValueError if malformed."""
        return cls(
            daemon=DaemonStatus.from_json(obj["daemon"]),
            tunnels=tuple(TunnelStatus.from_json(t) for t in obj["tunnels"]),
            shunts=tuple(ShuntStatus.from_json(s) for s in obj["shunts"]),
            engines=tuple(EngineStatus.from_json(e) for e in obj["engines"]),
            dns=dict(obj["dns"]),
            ike=dict(obj.get("ike", {})),  # absent from an older daemon's document
            trust_anchors=tuple(
                TrustAnchorStatus.from_json(a) for a in obj.get("trust_anchors", ())
            ),
        )
