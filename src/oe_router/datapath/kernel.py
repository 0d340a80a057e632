"""Kernel ESP datapath: XFRM SAs and policies over NETLINK_XFRM (pyroute2 sockets).

Ownership: every SA we install carries a reqid from `Ownership.reqid_*` and
every policy a priority in `Ownership.priority_*`, so a restarted daemon can
tell its own kernel objects from those of other IKE daemons and reconcile
them; nothing outside those ranges is ever touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, NamedTuple

from pyroute2.netlink import NETLINK_XFRM, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from oe_router.datapath import xfrm_msg as X
from oe_router.datapath.base import (
    ICMP_PROTOS,
    NO_LIFETIME,
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    DatapathEvent,
    Direction,
    Expire,
    FeatureMissing,
    IPAddress,
    Lifetime,
    MappingChange,
    Mark,
    Mode,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    ReconcileReport,
    SaCounters,
    SaKeys,
    Template,
    TrafficSelector,
    child_policies,
)
from oe_router.datapath.xfrm_batch import (
    Ack,
    Batch,
    Group,
    Path,
    Prototype,
    group,
    prototype,
    read_acks,
    success_ack,
)
from oe_router.netns import in_netns
from oe_router.records import record

IP_XFRM_POLICY: Final = 17
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10  # error ACKs without the echoed request (which holds keys)
NETLINK_EXT_ACK: Final = 11  # error ACKs with the kernel's reason in words
#: Messages per send: their ACKs (about 1 KiB of socket buffer each) must fit the default
#: receive buffer, or the kernel drops some and the outcome of those is unknown.
MAX_PER_SEND: Final = 64
#: The kernel answers inside send(); this bounds the wait if it somehow did not.
ACK_TIMEOUT: Final = 2.0
IPV6_XFRM_POLICY: Final = 35
UDP_ENCAP: Final = 100
SOL_UDP: Final = 17
_REQ_ACK: Final = NLM_F_REQUEST | NLM_F_ACK
_REQ_DUMP: Final = NLM_F_REQUEST | NLM_F_DUMP
_DIRS: Final = {
    Direction.IN: X.XFRM_POLICY_IN,
    Direction.OUT: X.XFRM_POLICY_OUT,
    Direction.FWD: X.XFRM_POLICY_FWD,
}
_MODES: Final = {Mode.TUNNEL: X.XFRM_MODE_TUNNEL, Mode.TRANSPORT: X.XFRM_MODE_TRANSPORT}

log = logging.getLogger("oe_router.datapath")

# net.core XFRM knobs the OE trap policies rely on, set by reconcile() at daemon start
# (measured in the QEMU lab, docs/oe-gateway.md section 4):
# - xfrm_larval_drop=1 (the kernel default, written explicitly because another IKE daemon
#   may have changed it): with 0 the kernel still drops every packet of a source-NATed LAN
#   flow while its SA is negotiated (the NAT path looks up without the queue flag), and for
#   the router's own flows the queued packets were purged, not sent: 0 saved nothing.
# - xfrm_acq_expires=1 (default 30): the larval state a trapped packet creates survives the
#   Child SA (another reqid and mode) and suppresses new ACQUIREs for that destination, so a
#   new flow after a tunnel went away was black-holed for up to 30 s. The manager coalesces
#   the repeated ACQUIREs a short value causes during a slow negotiation.
KERNEL_SETTINGS: Final[Mapping[str, int]] = {"xfrm_larval_drop": 1, "xfrm_acq_expires": 1}


@record(frozen=True)
class Ownership:
    """The reqid range and priority band that mark kernel objects as ours.

    Kernel policy priority = priority_base + 2 * rank + persistent, so the
    lowest bit tells persistent ("private" block) policies apart without
    disturbing the order between ranks.  The defaults sit at numerically
    high (= weak) priorities, below hand-made or other daemons' policies.
    """

    reqid_min: int = 0x4F450000
    reqid_max: int = 0x4F45FFFF
    priority_base: int = 0x7E000000
    priority_ranks: int = 0x80000

    def owns_reqid(self, reqid: int) -> bool:
        return self.reqid_min <= reqid <= self.reqid_max

    def owns_priority(self, priority: int) -> bool:
        return 0 <= priority - self.priority_base < 2 * self.priority_ranks

    def kernel_priority(self, rank: int, persistent: bool) -> int:
        if not 0 <= rank < self.priority_ranks:
            raise DatapathError(f"policy rank {rank} outside 0..{self.priority_ranks - 1}")
        return self.priority_base + 2 * rank + int(persistent)

    def rank(self, priority: int) -> tuple[int, bool]:
        off = priority - self.priority_base
        return off // 2, bool(off & 1)


@record(frozen=True)
class SaInfo:
    """One SA as the kernel reports it (dump / get)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int
    reqid: int
    mode: int
    counters: SaCounters


# --- address and selector conversion ------------------------------------------------
def _family(addr: IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _addr_bytes(addr: IPAddress) -> bytes:
    return addr.packed.ljust(16, b"\0")


def _addr(raw: bytes, family: int) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


def _ts_from(raw: bytes, plen: int, proto: int, port: int, mask: int, fam: int) -> TrafficSelector:
    net = ipaddress.ip_network((_addr(raw, fam), plen), strict=False)
    return TrafficSelector(net, proto, port if mask else None)


def _selector(src: TrafficSelector, dst: TrafficSelector, prefix: str) -> dict[str, Any]:
    """Both sides -> one xfrm_selector.

    ICMP has no ports: the kernel matches an ICMP/ICMPv6 flow's type in ``sport`` and
    its code in ``dport`` in every direction (``xfrm_flowi_sport``/``_dport`` in
    include/net/xfrm.h), so the type goes to ``sport`` whichever side carries it.
    """
    icmp = src.icmp_type if src.icmp_type is not None else dst.icmp_type
    sport = src.port if icmp is None else icmp
    return {
        f"{prefix}daddr": _addr_bytes(dst.net.network_address),
        f"{prefix}saddr": _addr_bytes(src.net.network_address),
        f"{prefix}dport": dst.port or 0,
        f"{prefix}dport_mask": 0xFFFF if dst.port is not None else 0,
        f"{prefix}sport": sport or 0,
        f"{prefix}sport_mask": 0xFFFF if sport is not None else 0,
        f"{prefix}family": _family(src.net),
        f"{prefix}prefixlen_d": dst.net.prefixlen,
        f"{prefix}prefixlen_s": src.net.prefixlen,
        f"{prefix}proto": dst.proto or src.proto,
    }


def _selector_from(
    msg: Any, prefix: str, direction: Direction = Direction.OUT
) -> tuple[TrafficSelector, TrafficSelector]:
    """One xfrm_selector -> both sides; the inverse of ``_selector``.

    For ICMP/ICMPv6 ``sport`` is the type and ``dport`` the code (not modelled: no
    policy of ours names one). The type goes back on the remote side, as policy
    specs carry it: the destination of an OUT selector, the source of IN and FWD.
    """
    fam = msg[f"{prefix}family"]
    proto = msg[f"{prefix}proto"]
    saddr, plen_s = msg[f"{prefix}saddr"], msg[f"{prefix}prefixlen_s"]
    daddr, plen_d = msg[f"{prefix}daddr"], msg[f"{prefix}prefixlen_d"]
    sport, sport_mask = msg[f"{prefix}sport"], msg[f"{prefix}sport_mask"]
    dport, dport_mask = msg[f"{prefix}dport"], msg[f"{prefix}dport_mask"]
    if proto in ICMP_PROTOS:
        src = _ts_from(saddr, plen_s, proto, 0, 0, fam)
        dst = _ts_from(daddr, plen_d, proto, 0, 0, fam)
        if sport_mask:
            if direction is Direction.OUT:
                dst = replace(dst, icmp_type=sport & 0xFF)
            else:
                src = replace(src, icmp_type=sport & 0xFF)
        return src, dst
    src = _ts_from(saddr, plen_s, proto, sport, sport_mask, fam)
    dst = _ts_from(daddr, plen_d, proto, dport, dport_mask, fam)
    return src, dst


def _lifetime(lft: Lifetime, prefix: str) -> dict[str, int]:
    def lim(v: int) -> int:
        return v if v else X.XFRM_INF

    return {
        f"{prefix}soft_byte_limit": lim(lft.soft_bytes),
        f"{prefix}hard_byte_limit": lim(lft.hard_bytes),
        f"{prefix}soft_packet_limit": lim(lft.soft_packets),
        f"{prefix}hard_packet_limit": lim(lft.hard_packets),
        f"{prefix}soft_add_expires_seconds": lft.soft_seconds,
        f"{prefix}hard_add_expires_seconds": lft.hard_seconds,
        f"{prefix}soft_use_expires_seconds": lft.soft_use_seconds,
        f"{prefix}hard_use_expires_seconds": lft.hard_use_seconds,
    }


def _lifetime_from(msg: Any, prefix: str) -> Lifetime:
    def unlim(v: int) -> int:
        return 0 if v == X.XFRM_INF else v

    return Lifetime(
        soft_bytes=unlim(msg[f"{prefix}soft_byte_limit"]),
        hard_bytes=unlim(msg[f"{prefix}hard_byte_limit"]),
        soft_packets=unlim(msg[f"{prefix}soft_packet_limit"]),
        hard_packets=unlim(msg[f"{prefix}hard_packet_limit"]),
        soft_seconds=msg[f"{prefix}soft_add_expires_seconds"],
        hard_seconds=msg[f"{prefix}hard_add_expires_seconds"],
        soft_use_seconds=msg[f"{prefix}soft_use_expires_seconds"],
        hard_use_seconds=msg[f"{prefix}hard_use_expires_seconds"],
    )


def _template(t: Template) -> dict[str, Any]:
    return {
        "id_daddr": _addr_bytes(t.dst),
        "id_spi": t.spi,
        "id_proto": X.IPPROTO_ESP,
        "family": _family(t.dst),
        "saddr": _addr_bytes(t.src),
        "reqid": t.reqid,
        "mode": _MODES[t.mode],
        "aalgos": 0xFFFFFFFF,
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }


def _template_from(raw: dict[str, Any]) -> Template:
    fam = raw["family"]
    mode = Mode.TUNNEL if raw["mode"] == X.XFRM_MODE_TUNNEL else Mode.TRANSPORT
    return Template(
        _addr(raw["saddr"], fam), _addr(raw["id_daddr"], fam), raw["reqid"], mode, raw["id_spi"]
    )


def _sa_counters(msg: Any, prefix: str = "") -> SaCounters:
    return SaCounters(
        bytes=msg[f"{prefix}curlft_bytes"],
        packets=msg[f"{prefix}curlft_packets"],
        add_time=msg[f"{prefix}curlft_add_time"],
        use_time=msg[f"{prefix}curlft_use_time"],
        replay_errors=msg[f"{prefix}stats_replay"],
        integrity_failures=msg[f"{prefix}stats_integrity_failed"],
    )


# --- error translation ----------------------------------------------------------------
def explain(err: NetlinkError, what: str, alg: str = "") -> DatapathError:
    """Turn a kernel errno into one message naming the object and the missing feature."""
    exc = _explain(err, what, alg)
    exc.errno = err.code
    return exc


def _explain(err: NetlinkError, what: str, alg: str) -> DatapathError:
    code = err.code
    detail = str(err.args[1]) if len(err.args) > 1 and err.args[1] else ""
    kmsg = f" (kernel says: {detail})" if detail and detail != errno.errorcode.get(code) else ""
    if code == errno.EPROTONOSUPPORT:
        return FeatureMissing(
            f"kernel lacks ESP (esp4/esp6 module): cannot install {what}{kmsg}; "
            "load esp4/esp6 or use the userspace datapath"
        )
    if code in (errno.ENOSYS, errno.ENOENT) and what.startswith("SA"):
        if "algorithm" in detail or code == errno.ENOSYS:
            return FeatureMissing(
                f"kernel lacks crypto algorithm {alg or '?'}: cannot install {what}{kmsg}"
            )
        return FeatureMissing(f"kernel lacks ESP (esp4/esp6 module): cannot install {what}{kmsg}")
    if code == errno.EAFNOSUPPORT:
        return FeatureMissing(f"kernel lacks XFRM for this address family (xfrm6?): {what}{kmsg}")
    if code == errno.EPERM:
        return DatapathError(f"{what}: permission denied, XFRM needs CAP_NET_ADMIN{kmsg}")
    if code == errno.EEXIST:
        return DatapathError(f"{what}: already exists in the kernel (EEXIST){kmsg}")
    return DatapathError(f"{what}: kernel refused: {errno.errorcode.get(code, code)}{kmsg}")


def _open_xfrm_socket(netns: str | None, groups: tuple[int, ...] = ()) -> Any:
    try:
        # bind() too: on a taken port id pyroute2 recreates the socket, which
        # must again happen inside the namespace.
        with in_netns(netns):
            sock = NetlinkSocket(family=NETLINK_XFRM, ext_ack=True)
            sock.bind()
        for group in groups:
            sock.add_membership(group)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise FeatureMissing(
                "kernel lacks XFRM netlink (xfrm_user module): cannot use the kernel datapath"
            ) from None
        raise DatapathError(f"opening the XFRM netlink socket failed: {exc}") from None
    for mtype, cls, _ in X.MESSAGES:
        sock.marshal.msg_map[mtype] = cls
    return sock


# --- per-socket helpers for the IKE endpoint ------------------------------------------
def bypass_socket(sock: socket.socket) -> None:
    """Exempt an IKE socket from all XFRM policies, in and out (IP(V6)_XFRM_POLICY allow).

    Without this, OE trap policies that cover the peer capture IKE itself.
    """
    if sock.family == socket.AF_INET:
        level, opt = socket.IPPROTO_IP, IP_XFRM_POLICY
    elif sock.family == socket.AF_INET6:
        level, opt = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    else:
        raise DatapathError(f"bypass policy: socket family {sock.family} is not IP")
    for direction in (X.XFRM_POLICY_IN, X.XFRM_POLICY_OUT):
        info = X.XFRM_USERPOLICY_INFO.pack(
            {
                "sel_family": sock.family,
                **_lifetime(Lifetime(), "lft_"),
                "dir": direction,
                "action": X.XFRM_POLICY_ALLOW,
            }
        )
        try:
            sock.setsockopt(level, opt, info)
        except OSError as exc:
            raise DatapathError(
                f"IKE socket bypass policy ({'in' if direction == 0 else 'out'}) failed: "
                f"{exc.strerror}; is the xfrm_user module loaded and CAP_NET_ADMIN held?"
            ) from None


def enable_esp_in_udp(sock: socket.socket) -> None:
    """Make a UDP 4500 socket decapsulate ESP-in-UDP (RFC 3948, UDP_ENCAP_ESPINUDP)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_ENCAP, X.UDP_ENCAP_ESPINUDP)
    except OSError as exc:
        raise FeatureMissing(
            f"kernel refused UDP_ENCAP_ESPINUDP on the NAT-T socket: {exc.strerror}"
        ) from None


class XfrmSocketHooks:
    """The XFRM side of the IKE endpoint's ``SocketHooks`` (strongSwan's kernel_ipsec
    ``bypass_socket`` and ``enable_udp_decap``): every IKE socket bypasses all policies
    (OE traps must never capture IKE itself), the NAT-T socket decapsulates ESP-in-UDP.

    Where the kernel has no XFRM (a container, a test box) this is logged once and IKE
    runs on; the remaining sockets of that start are left alone. ``note`` says which.
    """

    def __init__(self) -> None:
        self.note = "not started"
        self._failed = False

    def before_bind(self, sock: socket.socket, natt: bool) -> None:
        """Nothing: both options apply to a bound socket."""

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None:
        if self._failed:
            return
        try:
            bypass_socket(sock)
            if natt:
                enable_esp_in_udp(sock)
        except DatapathError as exc:
            if self.note != f"XFRM unavailable: {exc}":
                logging.getLogger("oe_router.ike").warning(
                    "IKE sockets run without kernel IPsec hooks: %s", exc
                )
            self.note = f"XFRM unavailable: {exc}"
            self._failed = True
            return
        self.note = "bypass policies on, UDP_ENCAP_ESPINUDP on the NAT-T socket"

    def closing(self, ip: str) -> None:
        """The endpoint stops: its next start tries the kernel again."""
        self._failed = False


def _iter_messages(data: bytes) -> Iterator[Any]:
    offset = 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        if length < 16 or offset + length > len(data):
            return
        with contextlib.suppress(KeyError):  # a message type we do not parse
            yield X.decode(data[offset : offset + length])
        offset += (length + 3) & ~3


def _open_batch_socket(netns: str | None) -> socket.socket:
    """The persistent raw NETLINK_XFRM socket that installs and deletes go out on."""
    try:
        with in_netns(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise FeatureMissing(
                "kernel lacks XFRM netlink (xfrm_user module): cannot use the kernel datapath"
            ) from None
        raise DatapathError(f"opening the XFRM netlink socket failed: {exc}") from None
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        with contextlib.suppress(OSError):  # older kernels: ACKs without the reason
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DatapathError(f"setting up the XFRM netlink socket failed: {exc}") from None
    return sock


# --- prepared messages: one prototype per shape, patched per install -------------------
_PROTOTYPES: dict[tuple[Any, ...], Prototype] = {}
_MAX_PROTOTYPES: Final = 1024  # shapes are few (algorithms x families x ranks); a bound anyway
_NO_LIFETIME: Final = NO_LIFETIME


def _prepared(
    shape: tuple[Any, ...],
    make: Callable[[], tuple[int, dict[str, Any], list[tuple[str, Any]]]],
    paths: Sequence[Path],
) -> Prototype:
    proto = _PROTOTYPES.get(shape)
    if proto is None:
        if len(_PROTOTYPES) >= _MAX_PROTOTYPES:
            _PROTOTYPES.clear()
        msg_type, fields, attrs = make()
        proto = _PROTOTYPES[shape] = prototype(msg_type, fields, attrs, paths)
    return proto


def _sa_variables(
    spec: ChildSaSpec, src: IPAddress, dst: IPAddress, keys: SaKeys, transport_sel: bool
) -> tuple[list[Path], list[Any]]:
    """The fields of an SA message that differ between Child SAs of one shape, and the
    values ``sa_request`` gives them (tests/unit/test_xfrm_batch.py checks both agree)."""
    paths: list[Path] = ["id_daddr", "saddr", "id_spi", "reqid"]
    values: list[Any] = [dst.packed, src.packed, keys.spi, spec.reqid]
    if spec.encr.aead:
        paths.append((X.XFRMA_ALG_AEAD, 0, "alg_key"))
        values.append(keys.encr_key)
    else:
        paths += ((X.XFRMA_ALG_CRYPT, 0, "alg_key"), (X.XFRMA_ALG_AUTH_TRUNC, 0, "alg_key"))
        values += (keys.encr_key, keys.integ_key)
    if spec.encap is not None:
        is_out = src == spec.local
        lp, rp = spec.encap.local_port, spec.encap.remote_port
        paths += ((X.XFRMA_ENCAP, 0, "encap_sport"), (X.XFRMA_ENCAP, 0, "encap_dport"))
        values += (lp, rp) if is_out else (rp, lp)
    if transport_sel:
        lts, rts = spec.local_ts[0], spec.remote_ts[0]
        a, b = (lts, rts) if src == spec.local else (rts, lts)
        for name, value in _selector(a, b, "sel_").items():
            paths.append(name)
            values.append(value)
    return paths, values


def _sa_shape(spec: ChildSaSpec, keys: SaKeys) -> tuple[Any, ...]:
    """What both SAs of a Child SA share in their prototypes' shapes."""
    return (
        spec.local.version,
        spec.mode,
        spec.encr,
        spec.integ,
        len(keys.encr_key),
        len(keys.integ_key),
        spec.esn,
        spec.replay_window,
        spec.encap is not None,
        spec.mode is Mode.TRANSPORT and bool(spec.local_ts and spec.remote_ts),
        None if spec.lifetime is _NO_LIFETIME or spec.lifetime == _NO_LIFETIME else spec.lifetime,
        spec.mark,
    )


def policy_request(
    policy: PolicySpec, own: Ownership
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """UPDPOLICY fields and attributes for one policy."""
    block = policy.action in (PolicyAction.DROP, PolicyAction.HOLD)
    fields = {
        **_selector(policy.src, policy.dst, "sel_"),
        "dir": _DIRS[policy.direction],
        **_lifetime(policy.lifetime, "lft_"),
        "priority": own.kernel_priority(policy.priority, policy.persistent),
        "action": X.XFRM_POLICY_BLOCK if block else X.XFRM_POLICY_ALLOW,
    }
    attrs: list[tuple[str, Any]] = []
    if policy.templates:
        attrs.append(("XFRMA_TMPL", [_template(t) for t in policy.templates]))
    if policy.mark is not None:
        attrs.append(("XFRMA_MARK", {"v": policy.mark.value, "m": policy.mark.mask}))
    return fields, attrs


_TMPL_VARIABLE: Final = ("id_daddr", "saddr", "reqid")
_BLOCKING: Final = (PolicyAction.DROP, PolicyAction.HOLD)


def _selector_parts(
    src: TrafficSelector, dst: TrafficSelector
) -> tuple[tuple[Any, ...], list[Path], list[Any]]:
    """``_selector`` split into what goes into a prototype's shape (family, protocol, which
    ports are set) and the fields patched per message (addresses, prefix lengths, and the
    ports that are set), with their values. Prefix lengths are patched, not shaped: the
    policy groups' networks come in every length."""
    icmp = src.icmp_type if src.icmp_type is not None else dst.icmp_type
    sport = src.port if icmp is None else icmp
    dnet, snet = dst.net, src.net
    shape = (snet.version, dst.proto or src.proto, dst.port is not None, sport is not None)
    paths: list[Path] = ["sel_daddr", "sel_saddr", "sel_prefixlen_d", "sel_prefixlen_s"]
    values: list[Any] = [
        dnet.network_address.packed,
        snet.network_address.packed,
        dnet.prefixlen,
        snet.prefixlen,
    ]
    if dst.port is not None:
        paths.append("sel_dport")
        values.append(dst.port)
    if sport is not None:
        paths.append("sel_sport")
        values.append(sport)
    return shape, paths, values


def add_policy(batch: Batch, policy: PolicySpec, own: Ownership, tag: Any) -> None:
    """Append an UPDPOLICY (install or replace) for ``policy``.

    The shape holds what varies little (direction, template SPIs, lifetime, mark);
    addresses, ports, the priority and reqids are patched: a few stores per message. (With
    the priority in the shape, the start's ~60 group policies, each ranked by its prefix,
    made ~50 shapes, each encoded once by the declared wire format: 0.2 s of a TCG
    router's start.)"""
    sel_shape, sel_paths, values = _selector_parts(policy.src, policy.dst)
    tmpls = policy.templates
    lft = policy.lifetime
    values.append(own.kernel_priority(policy.priority, policy.persistent))
    shape = (
        "policy",
        sel_shape,
        policy.direction,
        policy.action in _BLOCKING,
        tuple([(t.dst.version, t.mode, t.spi) for t in tmpls]),
        None if lft is _NO_LIFETIME or lft == _NO_LIFETIME else lft,
        policy.mark,
    )
    for t in tmpls:
        values += (t.dst.packed, t.src.packed, t.reqid)
    proto = _PROTOTYPES.get(shape)
    if proto is None:
        paths = [
            *sel_paths,
            "priority",
            *[(X.XFRMA_TMPL, i, name) for i in range(len(tmpls)) for name in _TMPL_VARIABLE],
        ]

        def make() -> tuple[int, dict[str, Any], list[tuple[str, Any]]]:
            return (X.XFRM_MSG_UPDPOLICY, *policy_request(policy, own))

        proto = _prepared(shape, make, paths)
    batch.add(proto, values, tag)


# --- a Child SA's messages as two prepared groups (its SAs, its policies) ---------------
_GROUPS: dict[tuple[Any, ...], Group] = {}


def _grouped(shape: tuple[Any, ...], make: Callable[[], list[Prototype]]) -> Group:
    grp = _GROUPS.get(shape)
    if grp is None:
        if len(_GROUPS) >= _MAX_PROTOTYPES:
            _GROUPS.clear()
        grp = _GROUPS[shape] = group(make())
    return grp


def add_child_sas(
    batch: Batch, spec: ChildSaSpec, update_in: bool, update_out: bool, tags: Sequence[Any]
) -> None:
    """Append both SAs of a Child SA, inbound then outbound (NEWSA, or UPDSA over an
    allocated SPI), as one group: one shape lookup and one copy per install."""
    local, remote, ins, outs = spec.local, spec.remote, spec.inbound, spec.outbound
    base = _sa_shape(spec, ins)
    shape = ("sas", base, update_in, update_out, len(outs.encr_key), len(outs.integ_key))
    in_paths, values = _sa_variables(spec, remote, local, ins, base[9])
    out_paths, out_values = _sa_variables(spec, local, remote, outs, base[9])
    values += out_values

    def make() -> list[Prototype]:
        protos = []
        for src, dst, keys, update, paths in (
            (remote, local, ins, update_in, in_paths),
            (local, remote, outs, update_out, out_paths),
        ):
            zero = SaKeys(keys.spi, bytes(len(keys.encr_key)), bytes(len(keys.integ_key)))
            fields, attrs = sa_request(spec, src, dst, zero)
            msg_type = X.XFRM_MSG_UPDSA if update else X.XFRM_MSG_NEWSA
            protos.append(prototype(msg_type, fields, attrs, paths))
        return protos

    batch.add_group(_grouped(shape, make), values, tags)


def add_child_policies(
    batch: Batch, spec: ChildSaSpec, own: Ownership, pols: Sequence[PolicySpec], tags: Sequence[Any]
) -> None:
    """Append the UPDPOLICYs of ``pols`` = ``child_policies(spec)`` as one group.

    The group's shape is looked up once per Child SA instead of once per policy; the
    values follow child_policies' layout (out, in, then fwd for tunnels, per selector
    pair: fwd is in's twin, templates join the spec's addresses). Bytes equal
    ``add_policy`` for each policy (tests/unit/test_xfrm_batch.py)."""
    step = 3 if spec.mode is Mode.TUNNEL else 2  # out, in (, fwd) per selector pair
    lpk, rpk, reqid = spec.local.packed, spec.remote.packed, spec.reqid
    shapes = []
    values: list[Any] = []
    for i in range(0, len(pols), step):
        out, inbound = pols[i], pols[i + 1]
        out_shape, _, out_values = _selector_parts(out.src, out.dst)
        in_shape, _, in_values = _selector_parts(inbound.src, inbound.dst)
        shapes.append((out_shape, in_shape))
        values += out_values
        values += (rpk, lpk, reqid)  # the out template: remote <- local
        in_values += (lpk, rpk, reqid)
        values += in_values
        if step == 3:
            values += in_values  # fwd: the in policy's selector and template
    shape = (
        "child-policies",  # child_policies' are never persistent and have no lifetime
        spec.local.version,
        spec.mode,
        own.kernel_priority(spec.policy_priority, False),
        spec.mark,
        tuple(shapes),
    )

    def make() -> list[Prototype]:
        protos = []
        for pol in pols:
            _, paths, _ = _selector_parts(pol.src, pol.dst)
            paths += [(X.XFRMA_TMPL, 0, name) for name in _TMPL_VARIABLE]
            protos.append(prototype(X.XFRM_MSG_UPDPOLICY, *policy_request(pol, own), paths))
        return protos

    batch.add_group(_grouped(shape, make), values, tags)


def add_delete_sa(
    batch: Batch, src: IPAddress, dst: IPAddress, spi: int, proto_: int, tag: Any
) -> None:
    """Append a DELSA for (dst, spi, proto) from src."""
    fields = {"daddr": _addr_bytes(dst), "spi": spi, "family": _family(dst), "proto": proto_}

    def make() -> tuple[int, dict[str, Any], list[tuple[str, Any]]]:
        return X.XFRM_MSG_DELSA, fields, [("XFRMA_SRCADDR", _addr_bytes(src))]

    paths: list[Path] = ["daddr", "spi", (X.XFRMA_SRCADDR, 0, "value")]
    proto = _prepared(("delsa", dst.version, proto_), make, paths)
    batch.add(proto, [dst.packed, spi, src.packed], tag)


def add_delete_policy(batch: Batch, policy: PolicySpec, tag: Any) -> None:
    """Append a DELPOLICY for the policy's selector, direction and mark."""
    sel = _selector(policy.src, policy.dst, "sel_")
    mark = policy.mark

    def make() -> tuple[int, dict[str, Any], list[tuple[str, Any]]]:
        attrs: list[tuple[str, Any]] = []
        if mark is not None:
            attrs.append(("XFRMA_MARK", {"v": mark.value, "m": mark.mask}))
        return X.XFRM_MSG_DELPOLICY, {**sel, "dir": _DIRS[policy.direction]}, attrs

    paths: list[Path] = [*sel, "dir"]
    proto = _prepared(("delpolicy", policy.src.net.version, mark), make, paths)
    batch.add(proto, [*sel.values(), _DIRS[policy.direction]], tag)


class _SaTag(NamedTuple):
    """What a batch message installs or deletes, for error messages and rollback
    (tuples: made five times per install, and a dataclass costs several times more)."""

    direction: str  # "in" / "out" ("" for a plain delete)
    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int = X.IPPROTO_ESP
    spec: ChildSaSpec | None = None

    def describe(self) -> str:
        d = f"{self.direction} " if self.direction else ""
        enc = f" ({self.spec.encr.ike_name})" if self.spec is not None else ""
        return f"SA {d}{self.src}->{self.dst} spi {self.spi:#010x}{enc}"


class _PolicyTag(NamedTuple):
    policy: PolicySpec
    previous: PolicySpec | None = None  # ours, replaced by this install (rollback restores it)

    def describe(self) -> str:
        return f"policy {self.policy.describe()}"


def _alg_of(tag: object) -> str:
    spec = tag.spec if isinstance(tag, _SaTag) else None
    if spec is None:
        return ""
    return spec.encr.kernel_name + (f" + {spec.integ.kernel_name}" if spec.integ else "")


def batch_error(batch: Batch, acks: Sequence[Ack], verb: str = "") -> DatapathError | None:
    """One error for a batch's refusals: the first refused object named with the kernel's
    reason (``explain``), then how many more were refused and which; None if all went in."""
    failed = [a for a in acks if a.errno]
    if not failed:
        return None
    first = failed[0]
    tag = batch.tags[first.item]
    what = f"{verb}{tag.describe()}"
    err = NetlinkError(first.errno, first.message or None)
    exc = explain(err, what, _alg_of(tag))
    if len(failed) > 1:
        more = ", ".join(
            f"{batch.tags[a.item].describe()} ({errno.errorcode.get(a.errno, a.errno)})"
            for a in failed[1:]
        )
        exc.args = (f"{exc} [also refused: {more}]",)
    return exc


# --- the datapath ---------------------------------------------------------------------
class XfrmDatapath:
    """The Datapath over kernel XFRM.  Construct, optionally reconcile(), use, close()."""

    def __init__(
        self,
        *,
        ownership: Ownership | None = None,
        keep_persistent_on_stop: bool = True,
        netns: str | None = None,
        reason: str = "kernel has ESP and XFRM netlink",
        spi_range: tuple[int, int] = (0xC0000000, 0xCFFFFFFF),
        kernel_settings: Mapping[str, int] = KERNEL_SETTINGS,
    ) -> None:
        self._own = ownership or Ownership()
        self._netns = netns
        self._kernel_settings = dict(kernel_settings)
        self._keep_persistent = keep_persistent_on_stop
        self._reason = reason
        self._spi_range = spi_range
        self._sock = _open_xfrm_socket(netns)
        try:
            self._nl = _open_batch_socket(netns)
        except DatapathError:
            self._sock.close()
            raise
        self._rbuf = bytearray(1 << 14)  # ACKs are capped (NETLINK_CAP_ACK): small
        self._seq = 1
        self._events_sock = _open_xfrm_socket(
            netns, (X.XFRMNLGRP_ACQUIRE, X.XFRMNLGRP_EXPIRE, X.XFRMNLGRP_MAPPING)
        )
        self._events_sock.setblocking(False)
        self._policies: dict[tuple[Any, ...], PolicySpec] = {}
        self._adopted: set[tuple[Any, ...]] = set()  # an earlier run's, not yet re-installed
        self._sas: dict[tuple[IPAddress, int], int] = {}  # (dst, spi) -> reqid
        self._allocated: set[tuple[IPAddress, int]] = set()
        self._next_reqid = self._own.reqid_min

    # -- status --
    @property
    def name(self) -> str:
        return "kernel-xfrm"

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def tunnel_device(self) -> str | None:
        return None  # XFRM transforms packets on their way out of the WAN device

    @property
    def ownership(self) -> Ownership:
        return self._own

    async def start(self) -> None:
        """Nothing to acquire: the netlink sockets are opened by the constructor."""

    def stats(self) -> dict[str, int]:
        """``policies``: our XFRM policies in the kernel now (groups, exclusions, SAs,
        shunts, and an earlier run's not yet released); the kernel keeps its own
        counters (/proc/net/xfrm_stat)."""
        return {"policies": len(self._policies)}

    # -- netlink plumbing --
    def _request(
        self,
        msg_type: int,
        fields: dict[str, Any],
        attrs: list[tuple[str, Any]],
        what: str,
        *,
        flags: int = _REQ_ACK,
        alg: str = "",
    ) -> list[Any]:
        msg = X.build(msg_type, fields, attrs)
        try:
            replies = self._sock.nlm_request(msg, msg_type, flags)
        except NetlinkError as err:
            raise explain(err, what, alg) from None
        return [r for r in replies if r["header"]["type"] >= X.XFRM_MSG_NEWSA]

    # -- SPIs and reqids --
    async def allocate_spi(self, local: IPAddress, remote: IPAddress, reqid: int) -> int:
        lo, hi = self._spi_range
        fields = {
            "info_id_daddr": _addr_bytes(local),
            "info_id_proto": X.IPPROTO_ESP,
            "info_saddr": _addr_bytes(remote),
            "info_family": _family(local),
            "info_reqid": reqid,
            "info_mode": X.XFRM_MODE_TUNNEL,
            **_lifetime(Lifetime(), "info_lft_"),
            "min": lo,
            "max": hi,
        }
        what = f"SPI allocation for {remote}->{local}"
        replies = self._request(X.XFRM_MSG_ALLOCSPI, fields, [], what, flags=NLM_F_REQUEST)
        if not replies:
            raise DatapathError(f"SPI allocation for {remote}->{local}: kernel sent no SPI")
        spi = int(replies[0]["id_spi"])
        self._allocated.add((local, spi))
        self._sas[(local, spi)] = reqid
        return spi

    def allocate_reqid(self) -> int:
        """A reqid in our range not used by a live SA of this run."""
        used = set(self._sas.values())
        span = self._own.reqid_max - self._own.reqid_min + 1
        for _ in range(span):
            reqid = self._next_reqid
            self._next_reqid = self._own.reqid_min + (reqid + 1 - self._own.reqid_min) % span
            if reqid not in used:
                return reqid
        raise DatapathError("no free reqid left in the owned range")

    # -- batches: one send, every failure and the send's last ACK read --
    def _batch(self) -> Batch:
        return Batch(self._seq)

    def _commit(self, batch: Batch) -> list[Ack]:
        """Send the batch (in sends of at most MAX_PER_SEND messages) and collect one Ack
        per message; a message whose outcome is unknown (its send's last message never
        answered, or answers dropped) gets ETIMEDOUT."""
        n = len(batch)
        self._seq = (self._seq + n) & 0xFFFFFFFF or 1
        acks: list[Ack | None] = [None] * n
        try:
            for first, last, start, end in batch.chunks(MAX_PER_SEND):
                batch.ask_ack(last - 1)
                try:
                    if n <= MAX_PER_SEND:
                        self._nl.send(batch.buf)
                    else:
                        with memoryview(batch.buf) as view:
                            self._nl.send(view[start:end])
                except OSError as exc:
                    for i in range(first, n):
                        acks[i] = Ack(i, exc.errno or errno.EIO, f"not sent: {exc.strerror}")
                    break
                self._collect(batch, acks, first, last)
        finally:
            batch.wipe()
        if None in acks:
            return [a if a is not None else Ack(i, errno.ETIMEDOUT) for i, a in enumerate(acks)]
        return acks  # type: ignore[return-value]  # no None left

    def _collect(self, batch: Batch, acks: list[Ack | None], first: int, last: int) -> None:
        """Read the answers to messages ``first .. last-1`` of which only the last asked
        for an ACK. The kernel answers the others only if they fail, and in order, so
        once the last is answered every message before it without an error went in.
        If answers were dropped (ENOBUFS), nothing is inferred: the unanswered stay
        unknown (ETIMEDOUT, undone like successes)."""
        final = last - 1
        deadline = 0.0
        lost = False
        rbuf = self._rbuf
        while acks[final] is None:
            try:
                size = self._nl.recv_into(rbuf)
            except BlockingIOError:
                if lost:
                    break  # answers dropped (ENOBUFS): the rest will not come
                now = time.monotonic()
                deadline = deadline or now + ACK_TIMEOUT
                if now >= deadline or not select.select([self._nl], [], [], deadline - now)[0]:
                    break
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise DatapathError(f"reading XFRM netlink ACKs failed: {exc}") from None
            item = success_ack(rbuf, size, batch.seq0, len(batch))
            if item >= 0:
                if first <= item < last and acks[item] is None:
                    acks[item] = Ack(item, 0)
                continue
            for ack in read_acks(rbuf, batch.seq0, len(batch), size):
                if first <= ack.item < last and acks[ack.item] is None:
                    acks[ack.item] = ack
        if acks[final] is not None and not lost:
            for i in range(first, final):
                if acks[i] is None:
                    acks[i] = Ack(i, 0)

    def _rollback(self, batch: Batch, acks: Sequence[Ack]) -> str:
        """Undo what a failed install batch put in: delete the SAs that went in, and give
        each policy that went in back its earlier version of ours (a rekey's) or delete
        it. Objects the kernel refused are left alone (a refused NEWSA's SPI may belong to
        someone else). Returns "" or words on what could not be undone."""
        undo = self._batch()
        for ack in acks:
            if ack.errno and ack.errno != errno.ETIMEDOUT:
                continue  # refused: nothing of ours went in (unknown outcome: undo anyway)
            tag = batch.tags[ack.item]
            if isinstance(tag, _SaTag):
                add_delete_sa(undo, tag.src, tag.dst, tag.spi, tag.proto, tag)
            elif isinstance(tag, _PolicyTag):
                if tag.previous is not None:
                    add_policy(undo, tag.previous, self._own, _PolicyTag(tag.previous))
                else:
                    add_delete_policy(undo, tag.policy, tag)
        if not len(undo):
            return ""
        bad = [
            a for a in self._commit(undo) if a.errno and a.errno not in (errno.ENOENT, errno.ESRCH)
        ]
        if not bad:
            return ""
        words = ", ".join(
            f"{undo.tags[a.item].describe()} ({errno.errorcode.get(a.errno, a.errno)})" for a in bad
        )
        log.error("rolling back a failed install left behind: %s", words)
        return words

    # -- SAs --
    def _delete_sa(
        self, src: IPAddress, dst: IPAddress, spi: int, proto: int = X.IPPROTO_ESP
    ) -> bool:
        batch = self._batch()
        add_delete_sa(batch, src, dst, spi, proto, _SaTag("", src, dst, spi, proto))
        (ack,) = self._commit(batch)
        self._sas.pop((dst, spi), None)
        self._allocated.discard((dst, spi))
        if ack.errno in (errno.ENOENT, errno.ESRCH):
            return False
        exc = batch_error(batch, [ack], "delete ")
        if exc is not None:
            raise exc
        return True

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        """Both SAs and the policies in one send; all in, or nothing of it (rolled back)."""
        if spec.reqid == 0:
            spec = replace(spec, reqid=self.allocate_reqid())
        elif not self._own.owns_reqid(spec.reqid):
            raise DatapathError(
                f"Child SA {spec.local}<->{spec.remote}: reqid {spec.reqid:#x} is outside the "
                f"owned range {self._own.reqid_min:#x}-{self._own.reqid_max:#x}"
            )
        batch, pols = self._child_sa_batch(spec)
        acks = self._commit(batch)
        exc = batch_error(batch, acks)
        if exc is None:
            for dst, spi in ((spec.local, spec.inbound.spi), (spec.remote, spec.outbound.spi)):
                self._allocated.discard((dst, spi))
                self._sas[(dst, spi)] = spec.reqid
            for key, pol in pols:
                self._policies[key] = pol
                if self._adopted:
                    self._adopted.discard(key)
            return spec
        left = self._rollback(batch, acks)
        for ack in acks:
            tag = batch.tags[ack.item]
            if isinstance(tag, _SaTag) and (not ack.errno or ack.errno == errno.ETIMEDOUT):
                self._sas.pop((tag.dst, tag.spi), None)  # deleted, an allocated SPI too
                self._allocated.discard((tag.dst, tag.spi))
        if left:
            exc.args = (f"{exc}; rollback left: {left}",)
        raise exc

    def _child_sa_batch(
        self, spec: ChildSaSpec
    ) -> tuple[Batch, list[tuple[tuple[Any, ...], PolicySpec]]]:
        """The install batch of a Child SA: SA in, SA out, then its policies (each tagged
        with the version of ours it replaces), and the policies with their keys.
        bench/bench_xfrm_host.py sends it alone."""
        batch = self._batch()
        local, remote = spec.local, spec.remote
        ins, outs = spec.inbound.spi, spec.outbound.spi
        add_child_sas(
            batch,
            spec,
            (local, ins) in self._allocated,
            (remote, outs) in self._allocated,
            (
                _SaTag("in", remote, local, ins, spec=spec),
                _SaTag("out", local, remote, outs, spec=spec),
            ),
        )
        return batch, self._child_policies_into(batch, spec)

    def _child_policies_into(
        self, batch: Batch, spec: ChildSaSpec
    ) -> list[tuple[tuple[Any, ...], PolicySpec]]:
        """Append a Child SA's policies to ``batch``; they with their keys (none if the
        spec installs none). bench/bench_xfrm_host.py sends them alone too."""
        if not spec.install_policies:
            return []
        pols = child_policies(spec)
        known = self._policies
        keyed, tags = [], []
        for pol in pols:
            key = (pol.src, pol.dst, pol.direction, pol.mark)  # self._key(pol), inlined
            keyed.append((key, pol))
            tags.append(_PolicyTag(pol, known.get(key)))
        add_child_policies(batch, spec, self._own, pols, tags)
        return keyed

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        """Policies (unless kept for a rekeyed SA) and both SAs in one send; objects
        already gone are fine."""
        batch = self._batch()
        if remove_policies and spec.install_policies:
            for pol in child_policies(spec):
                self._policies.pop(self._key(pol), None)
                add_delete_policy(batch, pol, _PolicyTag(pol))
        for src, dst, spi in (
            (spec.local, spec.remote, spec.outbound.spi),
            (spec.remote, spec.local, spec.inbound.spi),
        ):
            add_delete_sa(batch, src, dst, spi, X.IPPROTO_ESP, _SaTag("", src, dst, spi))
            self._sas.pop((dst, spi), None)
            self._allocated.discard((dst, spi))
        acks = [a for a in self._commit(batch) if a.errno not in (errno.ENOENT, errno.ESRCH)]
        exc = batch_error(batch, acks, "delete ")
        if exc is not None:
            raise exc

    def get_sa(self, src: IPAddress, dst: IPAddress, spi: int) -> SaInfo:
        """One ESP SA with its counters; DatapathError if the kernel has none."""
        fields = {
            "daddr": _addr_bytes(dst),
            "spi": spi,
            "family": _family(dst),
            "proto": X.IPPROTO_ESP,
        }
        attrs = [("XFRMA_SRCADDR", _addr_bytes(src))]
        what = f"SA {src}->{dst} spi {spi:#010x}"
        replies = self._request(X.XFRM_MSG_GETSA, fields, attrs, what, flags=NLM_F_REQUEST)
        if not replies:
            raise DatapathError(f"SA {src}->{dst} spi {spi:#010x}: not in the kernel")
        return self._sa_info(replies[0])

    @staticmethod
    def _sa_info(msg: Any) -> SaInfo:
        fam = msg["family"]
        return SaInfo(
            _addr(msg["saddr"], fam),
            _addr(msg["id_daddr"], fam),
            msg["id_spi"],
            msg["id_proto"],
            msg["reqid"],
            msg["mode"],
            _sa_counters(msg),
        )

    async def counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return self.read_counters(spec)

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        """Two GETSA requests for exactly this pair: a status of N tunnels costs 2N small
        netlink round trips, where a dump would carry every SA on the box with its keys."""
        inbound = self.get_sa(spec.remote, spec.local, spec.inbound.spi).counters
        outbound = self.get_sa(spec.local, spec.remote, spec.outbound.spi).counters
        return ChildSaCounters(inbound, outbound)

    def dump_sas(self) -> list[SaInfo]:
        """Every SA in the kernel (ours and others')."""
        replies = self._request(X.XFRM_MSG_GETSA, {}, [], "SA dump", flags=_REQ_DUMP)
        return [self._sa_info(m) for m in replies if m["header"]["type"] == X.XFRM_MSG_NEWSA]

    def orphaned_acquires(self, trap_reqid: int) -> list[Acquire]:
        """An earlier run's ACQUIREs, recovered from its larval states (spi 0, the trap's
        reqid): they cannot be deleted by SPI and hold their destination's packets until
        ``xfrm_acq_expires`` (30 s by default)."""
        return [
            Acquire(
                sa.src,
                sa.dst,
                TrafficSelector(ipaddress.ip_network(sa.src)),
                TrafficSelector(ipaddress.ip_network(sa.dst)),
                sa.reqid,
                0,
                0,
                0,
            )
            for sa in self.dump_sas()
            if sa.spi == 0 and sa.reqid == trap_reqid
        ]

    # -- policies --
    @staticmethod
    def _key(pol: PolicySpec) -> tuple[Any, ...]:
        return (pol.src, pol.dst, pol.direction, pol.mark)

    async def install_policy(self, policy: PolicySpec) -> None:
        await self.install_policies((policy,))

    async def install_policies(self, policies: Sequence[PolicySpec]) -> None:
        """One batch (an XFRM batch is no transaction: each message succeeds or not)."""
        if not policies:
            return
        batch = self._batch()
        for policy in policies:
            add_policy(batch, policy, self._own, _PolicyTag(policy))
        acks = self._commit(batch)
        for policy, ack in zip(policies, acks, strict=True):
            if not ack.errno:
                key = self._key(policy)
                self._policies[key] = policy
                self._adopted.discard(key)
        exc = batch_error(batch, acks)
        if exc is not None:
            raise exc

    async def remove_policy(self, policy: PolicySpec) -> None:
        self._delete_policy(policy)

    def _delete_policy(self, policy: PolicySpec) -> bool:
        self._policies.pop(self._key(policy), None)
        batch = self._batch()
        add_delete_policy(batch, policy, _PolicyTag(policy))
        (ack,) = self._commit(batch)
        if ack.errno in (errno.ENOENT, errno.ESRCH):
            return False
        exc = batch_error(batch, [ack], "delete ")
        if exc is not None:
            raise exc
        return True

    def dump_policies(self) -> list[tuple[int, PolicySpec | None]]:
        """Every main-type policy as (kernel priority, spec); spec is None if not ours."""
        replies = self._request(X.XFRM_MSG_GETPOLICY, {}, [], "policy dump", flags=_REQ_DUMP)
        out: list[tuple[int, PolicySpec | None]] = []
        for m in replies:
            if m["header"]["type"] != X.XFRM_MSG_NEWPOLICY:
                continue
            prio = m["priority"]
            out.append((prio, self._policy_from(m) if self._own.owns_priority(prio) else None))
        return out

    def _policy_from(self, m: Any) -> PolicySpec:
        direction = {v: k for k, v in _DIRS.items()}.get(m["dir"], Direction.OUT)
        src, dst = _selector_from(m, "sel_", direction)
        tmpls = tuple(_template_from(t) for t in (m.get_attr("XFRMA_TMPL") or []))
        if m["action"] == X.XFRM_POLICY_BLOCK:
            action = PolicyAction.DROP
        else:
            action = PolicyAction.IPSEC if tmpls else PolicyAction.PASS
        mark = m.get_attr("XFRMA_MARK")
        rank, persistent = self._own.rank(m["priority"])
        return PolicySpec(
            src,
            dst,
            direction,
            action,
            rank,
            tmpls,
            _lifetime_from(m, "lft_"),
            Mark(mark["v"], mark["m"]) if mark else None,
            persistent,
        )

    # -- lifecycle --
    def apply_kernel_settings(self) -> dict[str, int]:
        """Write the net.core XFRM knobs (KERNEL_SETTINGS) in our netns; returns those set.

        A read-only /proc/sys (a container) is logged, not fatal: OE still works, only
        with the kernel's own first-packet behaviour.
        """
        done: dict[str, int] = {}
        for name, value in self._kernel_settings.items():
            try:
                with in_netns(self._netns), open(f"/proc/sys/net/core/{name}", "w") as f:
                    f.write(f"{value}\n")
            except OSError as exc:
                log.warning("cannot set net.core.%s=%d: %s", name, value, exc.strerror)
                continue
            done[name] = value
        return done

    async def reconcile(
        self, adopt_policy: Callable[[PolicySpec], bool] | None = None
    ) -> ReconcileReport:
        set_ = self.apply_kernel_settings()
        if set_:
            log.info("%s", ", ".join(f"net.core.{k}={v}" for k, v in sorted(set_.items())))
        removed_sas = adopted_sas = adopted_p = removed_p = 0
        for sa in self.dump_sas():
            stale = self._own.owns_reqid(sa.reqid) and (sa.dst, sa.spi) not in self._sas
            if stale and self._delete_sa(sa.src, sa.dst, sa.spi, sa.proto):
                removed_sas += 1
        for _, pol in self.dump_policies():
            if pol is None or self._key(pol) in self._policies:
                continue
            if adopt_policy is None or adopt_policy(pol):
                self._policies[self._key(pol)] = pol
                self._adopted.add(self._key(pol))
                adopted_p += 1
            elif self._delete_policy(pol):
                removed_p += 1
        return ReconcileReport(adopted_sas, removed_sas, adopted_p, removed_p)

    async def release_adopted(self, keep: Callable[[PolicySpec], bool]) -> int:
        removed = 0
        for key in list(self._adopted):
            self._adopted.discard(key)
            pol = self._policies.get(key)
            if pol is not None and not keep(pol):
                removed += int(self._delete_policy(pol))
        return removed

    async def flush_owned(self, *, keep_persistent: bool = False) -> int:
        """Remove every SA and policy in our ranges (never other daemons' objects)."""
        n = 0
        for sa in self.dump_sas():
            if self._own.owns_reqid(sa.reqid) and self._delete_sa(sa.src, sa.dst, sa.spi, sa.proto):
                n += 1
        for _, pol in self.dump_policies():
            if pol is not None and not (keep_persistent and pol.persistent):
                n += int(self._delete_policy(pol))
        return n

    async def close(self) -> None:
        try:
            for pol in list(self._policies.values()):
                if not (self._keep_persistent and pol.persistent):
                    self._delete_policy(pol)
            if self._sas:
                for sa in self.dump_sas():
                    if (sa.dst, sa.spi) in self._sas:
                        self._delete_sa(sa.src, sa.dst, sa.spi, sa.proto)
        finally:
            self._sock.close()
            self._nl.close()
            self._events_sock.close()

    # -- events --
    async def events(self) -> AsyncIterator[DatapathEvent]:
        loop = asyncio.get_running_loop()
        fd = self._events_sock.fileno()
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                while True:
                    try:
                        data = self._events_sock._sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:
                            continue  # overflow: events were lost; the manager re-syncs
                        raise
                    for msg in _iter_messages(data):
                        event = parse_event(msg)
                        if event is not None:
                            yield event
        finally:
            loop.remove_reader(fd)


def sa_request(
    spec: ChildSaSpec, src: IPAddress, dst: IPAddress, keys: SaKeys
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """NEWSA/UPDSA fields and attributes for one direction of a Child SA."""
    flags = 0
    window = spec.replay_window
    fields: dict[str, Any] = {
        "sel_family": _family(src),
        "id_daddr": _addr_bytes(dst),
        "id_spi": keys.spi,
        "id_proto": X.IPPROTO_ESP,
        "saddr": _addr_bytes(src),
        "family": _family(src),
        "reqid": spec.reqid,
        "mode": _MODES[spec.mode],
        **_lifetime(spec.lifetime, "lft_"),
    }
    if spec.mode is Mode.TRANSPORT and spec.local_ts and spec.remote_ts:
        lts, rts = spec.local_ts[0], spec.remote_ts[0]
        a, b = (lts, rts) if src == spec.local else (rts, lts)
        fields.update(_selector(a, b, "sel_"))
    attrs: list[tuple[str, Any]] = []
    if spec.encr.aead:
        attrs.append(
            (
                "XFRMA_ALG_AEAD",
                {
                    "alg_name": spec.encr.kernel_name.encode(),
                    "alg_key_len": len(keys.encr_key) * 8,
                    "alg_icv_len": spec.encr.icv_bits,
                    "alg_key": keys.encr_key,
                },
            )
        )
    else:
        attrs.append(
            (
                "XFRMA_ALG_CRYPT",
                {
                    "alg_name": spec.encr.kernel_name.encode(),
                    "alg_key_len": len(keys.encr_key) * 8,
                    "alg_key": keys.encr_key,
                },
            )
        )
        assert spec.integ is not None  # ChildSaSpec enforces it
        attrs.append(
            (
                "XFRMA_ALG_AUTH_TRUNC",
                {
                    "alg_name": spec.integ.kernel_name.encode(),
                    "alg_key_len": len(keys.integ_key) * 8,
                    "alg_trunc_len": spec.integ.trunc_bits,
                    "alg_key": keys.integ_key,
                },
            )
        )
    if spec.esn or window > 32:
        if spec.esn:
            flags |= X.XFRM_STATE_ESN
        words = (window + 31) // 32
        attrs.append(
            (
                "XFRMA_REPLAY_ESN_VAL",
                {"bmp_len": words, "replay_window": window, "bmp": bytes(4 * words)},
            )
        )
    else:
        fields["replay_window"] = window
    fields["flags"] = flags
    if spec.encap is not None:
        out = src == spec.local
        attrs.append(
            (
                "XFRMA_ENCAP",
                {
                    "encap_type": X.UDP_ENCAP_ESPINUDP,
                    "encap_sport": spec.encap.local_port if out else spec.encap.remote_port,
                    "encap_dport": spec.encap.remote_port if out else spec.encap.local_port,
                    "encap_oa": bytes(16),
                },
            )
        )
    if spec.mark is not None:
        attrs.append(("XFRMA_MARK", {"v": spec.mark.value, "m": spec.mark.mask}))
    return fields, attrs


def parse_event(msg: Any) -> DatapathEvent | None:
    """A decoded multicast XFRM message -> typed event (None for other messages)."""
    mtype = msg["header"]["type"]
    if mtype == X.XFRM_MSG_ACQUIRE:
        fam = msg["policy_sel_family"] or msg["sel_family"]
        ssrc, sdst = _selector_from(msg, "sel_")
        tmpls = msg.get_attr("XFRMA_TMPL") or []
        return Acquire(
            src=_addr(msg["saddr"], fam),
            dst=_addr(msg["id_daddr"], fam),
            selector_src=ssrc,
            selector_dst=sdst,
            reqid=tmpls[0]["reqid"] if tmpls else 0,
            seq=msg["seq"],
            policy_priority=msg["policy_priority"],
            policy_index=msg["policy_index"],
        )
    if mtype == X.XFRM_MSG_EXPIRE:
        fam = msg["state_family"]
        return Expire(
            _addr(msg["state_saddr"], fam),
            _addr(msg["state_id_daddr"], fam),
            msg["state_id_spi"],
            msg["state_reqid"],
            bool(msg["hard"]),
        )
    if mtype == X.XFRM_MSG_POLEXPIRE:
        direction = {v: k for k, v in _DIRS.items()}.get(msg["pol_dir"], Direction.OUT)
        src, dst = _selector_from(msg, "pol_sel_", direction)
        return PolicyExpire(src, dst, direction, msg["pol_priority"], bool(msg["hard"]))
    if mtype == X.XFRM_MSG_MAPPING:
        fam = msg["id_family"]
        return MappingChange(
            dst=_addr(msg["id_daddr"], fam),
            spi=msg["id_spi"],
            reqid=msg["reqid"],
            old_addr=_addr(msg["old_saddr"], fam),
            old_port=msg["old_sport"],
            new_addr=_addr(msg["new_saddr"], fam),
            new_port=msg["new_sport"],
        )
    return None
