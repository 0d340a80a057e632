"""The one Datapath interface the rest of oe-router codes against.

Two implementations sit behind it (kernel XFRM over netlink, userspace ESP
over TUN); the daemon picks one at start and `oe status` shows `name` and
`reason`.  Everything crossing the interface is an immutable value, so the
sans-IO cores (ike/, oe/) can build specs without touching sockets.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import field, replace
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from oe_router.records import record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IP protocols whose selectors carry a message type (ICMP, ICMPv6) instead of ports.
ICMP_PROTOS = (1, 58)


class DatapathError(Exception):
    """A datapath operation failed; the message names the object and the cause."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # the kernel's errno, when the kernel refused


class FeatureMissing(DatapathError):
    """The platform lacks something (kernel module, algorithm) the operation needs."""


# --- ESP algorithms: IKE transform ID -> kernel name and sizes --------------------
# IANA "Transform Type 1 - Encryption Algorithm" and "Type 3 - Integrity" IDs.
ENCR_AES_CBC = 12
ENCR_AES_GCM_16 = 20
ENCR_CHACHA20_POLY1305 = 28
AUTH_HMAC_SHA2_256_128 = 12
AUTH_HMAC_SHA2_384_192 = 13
AUTH_HMAC_SHA2_512_256 = 14


@record(frozen=True)
class EncrAlgorithm:
    """An ESP cipher.  For AEADs the key material includes a salt (RFC 4106/7634)."""

    ike_id: int
    ike_name: str
    kernel_name: str
    key_bits: tuple[int, ...]  # allowed cipher key sizes, salt excluded
    salt_bits: int
    icv_bits: int  # 0 for non-AEAD ciphers
    aead: bool


@record(frozen=True)
class IntegAlgorithm:
    """An ESP integrity algorithm with its RFC 4868 truncation length."""

    ike_id: int
    ike_name: str
    kernel_name: str
    key_bits: int
    trunc_bits: int


ESP_ENCR: Mapping[int, EncrAlgorithm] = MappingProxyType(
    {
        ENCR_AES_GCM_16: EncrAlgorithm(
            ENCR_AES_GCM_16, "AES_GCM_16", "rfc4106(gcm(aes))", (128, 192, 256), 32, 128, True
        ),
        ENCR_CHACHA20_POLY1305: EncrAlgorithm(
            ENCR_CHACHA20_POLY1305,
            "CHACHA20_POLY1305",
            "rfc7539esp(chacha20,poly1305)",
            (256,),
            32,
            128,
            True,
        ),
        ENCR_AES_CBC: EncrAlgorithm(
            ENCR_AES_CBC, "AES_CBC", "cbc(aes)", (128, 192, 256), 0, 0, False
        ),
    }
)
ESP_INTEG: Mapping[int, IntegAlgorithm] = MappingProxyType(
    {
        AUTH_HMAC_SHA2_256_128: IntegAlgorithm(
            AUTH_HMAC_SHA2_256_128, "HMAC_SHA2_256_128", "hmac(sha256)", 256, 128
        ),
        AUTH_HMAC_SHA2_384_192: IntegAlgorithm(
            AUTH_HMAC_SHA2_384_192, "HMAC_SHA2_384_192", "hmac(sha384)", 384, 192
        ),
        AUTH_HMAC_SHA2_512_256: IntegAlgorithm(
            AUTH_HMAC_SHA2_512_256, "HMAC_SHA2_512_256", "hmac(sha512)", 512, 256
        ),
    }
)


def encr_algorithm(ike_id: int) -> EncrAlgorithm:
    """Look up an ESP cipher by IKE transform ID; DatapathError names unknown IDs."""
    try:
        return ESP_ENCR[ike_id]
    except KeyError:
        raise DatapathError(f"ESP encryption transform {ike_id} is not supported") from None


def integ_algorithm(ike_id: int) -> IntegAlgorithm:
    """Look up an ESP integrity algorithm by IKE transform ID."""
    try:
        return ESP_INTEG[ike_id]
    except KeyError:
        raise DatapathError(f"ESP integrity transform {ike_id} is not supported") from None


# --- specs --------------------------------------------------------------------------
class Mode(enum.Enum):
    TUNNEL = "tunnel"
    TRANSPORT = "transport"

    # Members are singletons equal only to themselves: hash by identity, in C (Enum's
    # hashes the name in Python; modes and directions key every Child SA install).
    __hash__ = object.__hash__


class Direction(enum.Enum):
    IN = "in"
    OUT = "out"
    FWD = "fwd"

    __hash__ = object.__hash__  # as Mode's


class PolicyAction(enum.Enum):
    """What a policy does with matching packets.

    TRAP: IPsec with templates, but no SA yet, so the kernel sends ACQUIRE.
    IPSEC: the same kernel object, installed for an established Child SA.
    HOLD: drop while a negotiation runs (negotiation shunt).
    PASS: let through in the clear (failure shunt of private-or-clear, group clear).
    DROP: discard (group block, failure shunt of private).
    """

    TRAP = "trap"
    IPSEC = "ipsec"
    HOLD = "hold"
    PASS = "pass"
    DROP = "drop"


@record(frozen=True)
class TrafficSelector:
    """One side of a flow: a prefix, an IP protocol (0 = any) and a port (None = any).

    ``icmp_type`` (ICMP or ICMPv6 only) names a message type. ICMP has no ports: the
    kernel matches the type in the selector's *source*-port field whichever way the
    packet goes, so it belongs to the selector pair; we carry it on the remote side
    (like a destination port) and the kernel backend puts it where the kernel wants it.
    """

    net: IPNetwork
    proto: int = 0
    port: int | None = None
    icmp_type: int | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 0xFFFF:
            raise DatapathError(f"traffic selector {self.net}: port {self.port} out of range")
        if self.icmp_type is not None:
            if self.proto not in ICMP_PROTOS or self.port is not None:
                raise DatapathError(
                    f"traffic selector {self.net}: an ICMP type needs protocol icmp or "
                    f"icmpv6 and no port (got protocol {self.proto}, port {self.port})"
                )
            if not 0 <= self.icmp_type <= 0xFF:
                raise DatapathError(
                    f"traffic selector {self.net}: ICMP type {self.icmp_type} out of range"
                )

    def __hash__(self) -> int:
        """The dataclass hash, kept once computed: selectors key the datapaths' policy
        tables, and ipaddress hashes in Python (a Child SA install hashed six of them)."""
        try:
            return self.__dict__["_hash"]  # type: ignore[no-any-return]
        except KeyError:
            value = hash((self.net, self.proto, self.port, self.icmp_type))
            object.__setattr__(self, "_hash", value)
            return value


@record(frozen=True)
class Lifetime:
    """Kernel-enforced limits; 0 means unlimited.  Soft fires Expire(hard=False)."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_seconds: int = 0
    hard_seconds: int = 0
    soft_use_seconds: int = 0  # idle after last use
    hard_use_seconds: int = 0


#: No kernel limits. One shared instance (immutable) as the specs' default: a default
#: factory made a Child SA's policies a third more expensive to build.
NO_LIFETIME = Lifetime()


@record(frozen=True)
class Mark:
    value: int
    mask: int = 0xFFFFFFFF


@record(frozen=True)
class NatTEncap:
    """UDP encapsulation (RFC 3948); ports of the local and the remote IKE socket."""

    local_port: int = 4500
    remote_port: int = 4500


@record(frozen=True)
class SaKeys:
    """One direction of a Child SA.  encr_key includes the AEAD salt at its end.

    Keys never show in a repr: a logged spec must not put them into syslog."""

    spi: int
    encr_key: bytes = field(repr=False)
    integ_key: bytes = field(default=b"", repr=False)


@record(frozen=True)
class ChildSaSpec:
    """Everything needed to install both ESP SAs of a Child SA (and its policies).

    `inbound` is the SA the peer sends to us (destination = local),
    `outbound` the one we send on (destination = remote).  Traffic selectors
    are from our side's view; policies are installed for every
    (local_ts, remote_ts) pair: out local->remote, in and fwd remote->local.
    """

    local: IPAddress
    remote: IPAddress
    inbound: SaKeys
    outbound: SaKeys
    encr: EncrAlgorithm
    integ: IntegAlgorithm | None = None
    mode: Mode = Mode.TUNNEL
    local_ts: tuple[TrafficSelector, ...] = ()
    remote_ts: tuple[TrafficSelector, ...] = ()
    encap: NatTEncap | None = None
    esn: bool = False
    replay_window: int = 64
    reqid: int = 0  # 0: the datapath allocates one from its owned range
    lifetime: Lifetime = NO_LIFETIME
    mark: Mark | None = None
    install_policies: bool = True
    policy_priority: int = 0  # rank in the owned band: lower wins

    def __post_init__(self) -> None:
        if self.local.version != self.remote.version:
            raise DatapathError(f"Child SA {self.local}<->{self.remote}: address families differ")
        if self.encr.aead == (self.integ is not None):
            what = "an AEAD takes no" if self.encr.aead else "a non-AEAD cipher needs an"
            raise DatapathError(
                f"Child SA {self.local}<->{self.remote}: {what} integrity algorithm"
            )
        for keys, side in ((self.inbound, "inbound"), (self.outbound, "outbound")):
            bits = len(keys.encr_key) * 8 - self.encr.salt_bits
            if bits not in self.encr.key_bits:
                raise DatapathError(
                    f"Child SA {self.local}<->{self.remote}: {side} {self.encr.ike_name} key is "
                    f"{len(keys.encr_key)} bytes, expected cipher key "
                    f"{'/'.join(str(b // 8) for b in self.encr.key_bits)} bytes"
                    f"{' + 4 bytes salt' if self.encr.salt_bits else ''}"
                )
            if self.integ is not None and len(keys.integ_key) * 8 != self.integ.key_bits:
                raise DatapathError(
                    f"Child SA {self.local}<->{self.remote}: {side} {self.integ.ike_name} key is "
                    f"{len(keys.integ_key)} bytes, expected {self.integ.key_bits // 8}"
                )
            if not 0 < keys.spi <= 0xFFFFFFFF:
                raise DatapathError(f"Child SA {self.local}<->{self.remote}: bad {side} SPI")


@record(frozen=True)
class Template:
    """The SA a policy requires (XFRM template)."""

    src: IPAddress
    dst: IPAddress
    reqid: int
    mode: Mode = Mode.TUNNEL
    spi: int = 0


@record(frozen=True)
class PolicySpec:
    """A policy: selector, direction, action, rank in our priority band.

    For TRAP and IPSEC actions `templates` is required; `lifetime` gives
    shunts an expiry (a pass shunt for 15 minutes, say).  `persistent`
    marks policies that survive a clean stop ("private" block policies).
    """

    src: TrafficSelector
    dst: TrafficSelector
    direction: Direction
    action: PolicyAction
    priority: int = 0
    templates: tuple[Template, ...] = ()
    lifetime: Lifetime = NO_LIFETIME
    mark: Mark | None = None
    persistent: bool = False

    def __post_init__(self) -> None:
        needs = self.action in (PolicyAction.TRAP, PolicyAction.IPSEC)
        if needs and not self.templates:
            raise DatapathError(f"policy {self.describe()}: {self.action.value} needs a template")
        if not needs and self.templates:
            raise DatapathError(f"policy {self.describe()}: {self.action.value} takes no template")
        if self.src.net.version != self.dst.net.version:
            raise DatapathError(f"policy {self.describe()}: address families differ")
        # A kernel selector has one protocol: carry it on both sides so specs compare equal.
        sp, dp = self.src.proto, self.dst.proto
        if sp and dp and sp != dp:
            raise DatapathError(f"policy {self.describe()}: protocols {sp} and {dp} differ")
        if sp != dp:
            object.__setattr__(self, "src", replace(self.src, proto=sp or dp))
            object.__setattr__(self, "dst", replace(self.dst, proto=sp or dp))
        st, dt = self.src.icmp_type, self.dst.icmp_type
        if st is not None and dt is not None:
            raise DatapathError(
                f"policy {self.describe()}: an ICMP type goes on one side (the kernel "
                f"has one type field), got {st} and {dt}"
            )

    def describe(self) -> str:
        icmp = self.src.icmp_type if self.src.icmp_type is not None else self.dst.icmp_type
        kind = "" if icmp is None else f" icmp type {icmp}"
        return f"{self.src.net}->{self.dst.net}{kind} {self.direction.value} {self.action.value}"


def _host_network(addr: IPAddress) -> IPNetwork:
    """``ip_network(addr)`` without its round trip through text (a Child SA install's
    hot path: it made up a third of a Child SA's policies' cost)."""
    if addr.version == 4:
        return ipaddress.IPv4Network(int(addr))
    return ipaddress.IPv6Network(int(addr))


@functools.lru_cache(maxsize=4096)
def _host_selector(addr: IPAddress) -> TrafficSelector:
    """The selector of one host; cached (immutable): the WAN address is in every Child SA."""
    return TrafficSelector(_host_network(addr))


def child_selectors(
    spec: ChildSaSpec,
) -> tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]]:
    """The local and remote selectors ``child_policies`` pairs: the spec's, or each host."""
    return (
        spec.local_ts or (_host_selector(spec.local),),
        spec.remote_ts or (_host_selector(spec.remote),),
    )


def child_policies(spec: ChildSaSpec) -> list[PolicySpec]:
    """The IPSEC policies of a Child SA: out local->remote, in and (tunnel) fwd
    remote->local for every selector pair (in that order, pair by pair); what every
    datapath installs with it."""
    lts, rts = child_selectors(spec)
    out_t = _unchecked(Template, _template_fields(spec.local, spec.remote, spec.reqid, spec.mode))
    in_t = _unchecked(Template, _template_fields(spec.remote, spec.local, spec.reqid, spec.mode))
    pols = []
    prio, mark = spec.policy_priority, spec.mark
    ipsec = PolicyAction.IPSEC
    forever = NO_LIFETIME
    tunnel = spec.mode is Mode.TUNNEL
    for lt in lts:
        for rt in rts:
            if (
                lt.net.version == rt.net.version
                and lt.proto == rt.proto
                and (lt.icmp_type is None or rt.icmp_type is None)
            ):  # nothing for PolicySpec's checks to refuse or normalise
                fields = {
                    "src": lt,
                    "dst": rt,
                    "direction": Direction.OUT,
                    "action": ipsec,
                    "priority": prio,
                    "templates": (out_t,),
                    "lifetime": forever,
                    "mark": mark,
                    "persistent": False,
                }
                out = _unchecked(PolicySpec, fields)
            else:
                out = PolicySpec(lt, rt, Direction.OUT, ipsec, prio, (out_t,), forever, mark)
            pols.append(out)
            pols.append(_mirrored(out, Direction.IN, in_t))
            if tunnel:
                pols.append(_mirrored(out, Direction.FWD, in_t))
    return pols


def _template_fields(src: IPAddress, dst: IPAddress, reqid: int, mode: Mode) -> dict[str, Any]:
    return {"src": src, "dst": dst, "reqid": reqid, "mode": mode, "spi": 0}


_new_object = object.__new__
_set = object.__setattr__
_T = TypeVar("_T")


def _unchecked(cls: type[_T], fields: dict[str, Any]) -> _T:
    """``cls(**fields)`` for a frozen dataclass whose ``__post_init__`` (if any) could not
    refuse or change ``fields``, without running it or a setattr per field: about a
    third of the price, on every Child SA install. ``fields`` must name every field
    (tests/unit/test_xfrm_batch.py compares these objects with checked ones)."""
    obj: _T = _new_object(cls)
    _set(obj, "__dict__", fields)
    return obj


def _mirrored(pol: PolicySpec, direction: Direction, template: Template) -> PolicySpec:
    """``PolicySpec(pol.dst, pol.src, direction, ..., (template,), ...)`` unchecked: the
    checks are symmetric in the selectors and ``pol`` passed them (its selectors already
    carry the shared protocol), so they could not fail here."""
    fields = pol.__dict__.copy()
    fields["src"], fields["dst"] = pol.dst, pol.src
    fields["direction"] = direction
    fields["templates"] = (template,)
    return _unchecked(PolicySpec, fields)


# --- observations -------------------------------------------------------------------
@record(frozen=True)
class SaCounters:
    bytes: int
    packets: int
    add_time: int  # seconds since the epoch when installed
    use_time: int  # seconds since the epoch of first use, 0 if never used
    replay_errors: int = 0
    integrity_failures: int = 0


@record(frozen=True)
class ChildSaCounters:
    inbound: SaCounters
    outbound: SaCounters


@record(frozen=True)
class Acquire:
    """The kernel saw a packet for a TRAP policy without an SA."""

    src: IPAddress  # outer addresses from the template (what the SA should use)
    dst: IPAddress
    selector_src: TrafficSelector  # the packet's flow
    selector_dst: TrafficSelector
    reqid: int
    seq: int
    policy_priority: int
    policy_index: int


@record(frozen=True)
class Expire:
    """An SA hit its soft (rekey now) or hard (gone) lifetime."""

    src: IPAddress
    dst: IPAddress
    spi: int
    reqid: int
    hard: bool


@record(frozen=True)
class PolicyExpire:
    """A policy (shunt) hit its lifetime."""

    src: TrafficSelector
    dst: TrafficSelector
    direction: Direction
    priority: int
    hard: bool


@record(frozen=True)
class MappingChange:
    """A NAT-T peer's address or port changed (RFC 3948 mapping change)."""

    dst: IPAddress
    spi: int
    reqid: int
    old_addr: IPAddress
    old_port: int
    new_addr: IPAddress
    new_port: int


DatapathEvent = Acquire | Expire | PolicyExpire | MappingChange


@record(frozen=True)
class ReconcileReport:
    """What a start-up reconcile found of an earlier run."""

    adopted_sas: int
    removed_sas: int
    adopted_policies: int
    removed_policies: int


@runtime_checkable
class Datapath(Protocol):
    """The ESP datapath: installs Child SAs and policies, reports events."""

    @property
    def name(self) -> str:
        """Short name for `oe status` ("kernel-xfrm", "userspace-esp")."""
        ...

    @property
    def reason(self) -> str:
        """Why this datapath was chosen, for `oe status`."""
        ...

    @property
    def tunnel_device(self) -> str | None:
        """A network device protected packets are routed to (the userspace datapath's
        TUN), or None: the LAN gateway NATs flows leaving there as on the WAN."""
        ...

    async def start(self) -> None:
        """Acquire what the datapath needs from the machine (devices, workers); before
        ``reconcile`` and before the IKE sockets are bound."""
        ...

    async def allocate_spi(self, local: IPAddress, remote: IPAddress, reqid: int) -> int:
        """Reserve an inbound SPI (IKE needs it before the keys exist)."""
        ...

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        """Install both SAs (and policies); returns the spec with its reqid filled in."""
        ...

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        """Remove both SAs; keep the policies when a rekeyed SA replaces them."""
        ...

    async def install_policy(self, policy: PolicySpec) -> None:
        """Install or replace (same selector, direction, mark) a policy."""
        ...

    async def install_policies(self, policies: Sequence[PolicySpec]) -> None:
        """``install_policy`` for several, in order, in one step where the datapath can (the
        start's traps and passes: one netlink send, not one each). Each goes in or not on
        its own; DatapathError names every refused one."""
        ...

    async def remove_policy(self, policy: PolicySpec) -> None:
        """Remove a policy; absent policies are not an error."""
        ...

    async def counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        """Byte/packet counters of both SAs."""
        ...

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        """The same, synchronously: for `oe status`, which is built synchronously on
        request. Must stay cheap (a lookup per SA, never a dump of every SA);
        DatapathError if the SAs are gone."""
        ...

    def events(self) -> AsyncIterator[DatapathEvent]:
        """Acquire / Expire / PolicyExpire / Mapping events as they happen."""
        ...

    async def reconcile(
        self, adopt_policy: Callable[[PolicySpec], bool] | None = None
    ) -> ReconcileReport:
        """At start: remove an earlier run's SAs, adopt (or remove) its policies.

        SAs are removed because their IKE SA died with the old process; a
        policy is adopted (kept, and removed at clean stop) when
        `adopt_policy` says so (default: all), so "private" destinations
        stay blocked or trapped across a crash.
        """
        ...

    async def release_adopted(self, keep: Callable[[PolicySpec], bool]) -> int:
        """Remove adopted policies that nothing re-installed since, unless `keep` says so.

        Called once the new run's policies are in: removing an earlier run's policy
        before its replacement exists would open a window where packets leave in the
        clear. Returns how many were removed.
        """
        ...

    def stats(self) -> dict[str, int]:
        """The datapath's own counters for ``oe status`` (cheap; may be empty)."""
        ...

    def orphaned_acquires(self, trap_reqid: int) -> list[Acquire]:
        """Packets an earlier run's traps (``trap_reqid``) caught and the datapath still
        holds, as the ACQUIREs that run never answered; [] when the datapath keeps no such
        state across runs.

        Why: the kernel leaves a larval SA per trapped packet that holds further packets
        and suppresses new ACQUIREs for its lifetime; unanswered, a destination stalls
        that long after a crash.
        """
        ...

    async def close(self) -> None:
        """Clean stop: remove what we installed (persistent policies stay if configured)."""
        ...
