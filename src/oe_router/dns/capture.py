"""DNS capture: the router's own outgoing DNS goes to the front while (and only while) it runs.

Why: dnsmasq keeps its own upstreams (the WAN's resolvers), so when the daemon is down,
restarting, misconfigured or removed, LAN DNS still answers. While the front is up, an
nftables ``nat output`` chain redirects every DNS query this machine sends to a
non-local address (UDP and TCP port 53) to the front's loopback listener: dnsmasq's
forwards, whichever upstream it picks or retries, all reach the front, so the trigger is
never bypassed and a bogus answer's SERVFAIL is never retried elsewhere into an
unvalidated answer. The front's own upstream sockets carry ``CAPTURE_MARK`` (SO_MARK,
upstream.py) and are let through.

The table has ``flags owner``: the kernel ties it to the netlink socket that created it
and deletes it when that socket closes. That socket belongs to this process (a
libnftables context, loaded with ctypes), so any end of the daemon, ``kill -9``
included, drops the capture at once, with nobody left to clean up. It is held in
process rather than by a long-lived ``nft -i`` child because OpenWrt builds nft without
its interactive CLI (package/network/utils/nftables/Makefile: ``--without-cli``), while
both its nftables-json and nftables-nojson packages install libnftables.so.1. A table
with ``flags owner`` can be changed or deleted only by its owner, so another program's
``nft`` cannot take it away under us either.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from typing import Protocol

from oe_router.config.schema import Endpoint
from oe_router.records import record

__all__ = [
    "CAPTURE_MARK",
    "CAPTURE_TABLE",
    "CaptureError",
    "CapturePlan",
    "DnsCapture",
    "LibNftables",
    "NftSession",
    "capture_plan",
    "mark_supported",
]

log = logging.getLogger("oe_router.dns.capture")

#: The table (family inet) that holds the redirect.
CAPTURE_TABLE = "oe_dns"
#: SO_MARK of the front's own upstream queries, which the capture lets through: bit 30 and
#: 53 in the low byte. Chosen clear of the masks OpenWrt's policy-routing packages match
#: with (mwan3 0x3f00, pbr 0x00ff0000) and of the userspace datapath's own bits
#: (``UserspaceSettings.fwmark`` 0x1000000, ``stolen_mark`` 0x2000000, matched by mask:
#: the first choice, 0x4f000035, carried both, and the WAN egress hook dropped the front's
#: upstream queries as "stolen"), so it steers no route; only this table compares it, and
#: only for equality.
CAPTURE_MARK = 0x40000035
#: ``nat`` output hook priority: NF_IP_PRI_NAT_DST (-100), as nft's ``dstnat`` keyword in
#: prerouting (nft 1.0.6 accepts that keyword in output only for family ip/ip6).
_PRIORITY = -100


class CaptureError(Exception):
    """The capture could not be put in place; the message says why, in one line."""


@record(frozen=True)
class CapturePlan:
    """Where each family's queries go, and why a family is not captured."""

    v4: Endpoint | None
    v6: Endpoint | None
    #: one line per family left out (no loopback listener of that family)
    gaps: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in (self.v4, self.v6) if e is not None)


def _loopback(endpoint: Endpoint, family: int) -> bool:
    if endpoint.family != family or endpoint.port == 0:
        return False
    try:
        return ip_address(endpoint.host).is_loopback
    except ValueError:
        return False


def capture_plan(listen: Sequence[Endpoint]) -> CapturePlan:
    """The front's first loopback listener of each family as that family's target.

    Only loopback listeners are targets: a redirected query keeps this machine's source
    address, and the loopback listener answers every local client (access.py).
    """
    v4 = next((e for e in listen if _loopback(e, 4)), None)
    v6 = next((e for e in listen if _loopback(e, 6)), None)
    gaps = []
    if v4 is None:
        gaps.append("IPv4 DNS not captured: oe.dns.listen has no IPv4 loopback address")
    if v6 is None:
        gaps.append("IPv6 DNS not captured: oe.dns.listen has no IPv6 loopback address")
    return CapturePlan(v4, v6, tuple(gaps))


def capture_script(
    plan: CapturePlan, *, table: str = CAPTURE_TABLE, mark: int = CAPTURE_MARK
) -> str:
    """The whole owned table as one nft script (applied atomically).

    Order matters: the front's own queries (``mark``) first, then anything to a local
    address (dnsmasq itself on 127.0.0.1:53 or the LAN address, the front, a local
    resolver on another port), then the redirect of what is left: queries to other
    hosts on port 53.
    """
    if not plan.targets:
        raise CaptureError("; ".join(plan.gaps))
    lines = [
        f"table inet {table} {{",
        "\tflags owner",
        "\tchain output {",
        f"\t\ttype nat hook output priority {_PRIORITY}; policy accept;",
        f"\t\tmeta mark {mark:#x} return",
        "\t\tfib daddr type local return",
    ]
    if plan.v4 is not None:
        lines.append(
            f"\t\tmeta nfproto ipv4 meta l4proto {{ udp, tcp }} th dport 53"
            f" dnat ip to {plan.v4.host}:{plan.v4.port}"
        )
    if plan.v6 is not None:
        lines.append(
            f"\t\tmeta nfproto ipv6 meta l4proto {{ udp, tcp }} th dport 53"
            f" dnat ip6 to [{plan.v6.host}]:{plan.v6.port}"
        )
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def mark_supported(mark: int = CAPTURE_MARK) -> str | None:
    """None if this process may set SO_MARK (CAP_NET_ADMIN), else why not.

    Without it the front's own upstream queries would be captured back into the front.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as exc:
        return f"cannot mark the front's own queries (SO_MARK: {exc.strerror or exc})"
    return None


class NftSession(Protocol):
    """One netlink session with nf_tables: its tables with ``flags owner`` live as long as it."""

    def run(self, script: str) -> None:
        """Apply ``script``; CaptureError with nft's message on refusal."""

    def close(self) -> None:
        """End the session: the kernel drops the tables it owns."""


class LibNftables:
    """A libnftables context (``nft_ctx_new``): one netlink socket, this process's own."""

    def __init__(self, library: str | None = None) -> None:
        # the soname, not find_library: that needs ldconfig or gcc, which OpenWrt has not
        name = library or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise CaptureError(f"cannot load libnftables ({name}): {exc}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the netlink socket now
        if not ctx:
            raise CaptureError("libnftables: nft_ctx_new failed")
        lib.nft_ctx_buffer_error(ctx)
        lib.nft_ctx_buffer_output(ctx)
        self._lib: ctypes.CDLL | None = lib
        self._ctx: int | None = ctx

    def run(self, script: str) -> None:
        if self._lib is None or self._ctx is None:
            raise CaptureError("libnftables session is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        if rc != 0:
            raw = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            detail = " | ".join(
                ln for ln in raw.decode(errors="replace").splitlines() if ln.strip()
            )
            raise CaptureError(f"nft refused the DNS capture: {detail or rc}")

    def close(self) -> None:
        if self._lib is not None and self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
        self._lib = self._ctx = None


class DnsCapture:
    """The capture's state: on with its targets, or off and why (``oe status``)."""

    def __init__(
        self,
        session_factory: Callable[[], NftSession] = LibNftables,
        table: str = CAPTURE_TABLE,
        mark: int = CAPTURE_MARK,
        mark_check: Callable[[int], str | None] = mark_supported,
    ) -> None:
        self._factory = session_factory
        self.table = table
        self.mark = mark
        self._mark_check = mark_check
        self._session: NftSession | None = None
        self._plan: CapturePlan | None = None
        self.reason = "not started"

    @property
    def on(self) -> bool:
        return self._session is not None

    def start(self, listen: Sequence[Endpoint]) -> None:
        """Put the capture in place for ``listen`` (or replace it); never raises.

        A failure leaves the capture off with its reason logged once: dnsmasq then
        keeps asking its own upstreams, so LAN DNS still works, without the trigger.
        """
        plan = capture_plan(listen)
        if plan == self._plan and self._session is not None:
            return
        try:
            problem = self._mark_check(self.mark)
            if problem is not None:
                raise CaptureError(problem)
            script = capture_script(plan, table=self.table, mark=self.mark)
            session = self._session or self._factory()
            try:
                if self._session is not None:
                    # one batch: the old rules go and the new come in the same commit
                    script = f"delete table inet {self.table}\n{script}"
                session.run(script)
            except CaptureError:
                if session is not self._session:
                    session.close()
                raise
        except CaptureError as exc:
            self.stop(f"{exc}")
            log.warning("DNS capture off: %s; dnsmasq asks its upstreams directly", exc)
            return
        first = self._session is None
        self._session, self._plan = session, plan
        self.reason = ""
        if first:
            log.info("DNS capture on: %s", self.describe())
        for gap in plan.gaps:
            log.warning("DNS capture: %s", gap)

    def stop(self, reason: str = "DNS front stopped") -> None:
        """Drop the capture (closing the session drops the owned table)."""
        session, self._session, self._plan = self._session, None, None
        self.reason = reason
        if session is not None:
            try:
                session.run(f"delete table inet {self.table}\n")
            except CaptureError as exc:
                log.debug("DNS capture: %s (closing the session drops it anyway)", exc)
            session.close()
            log.info("DNS capture off: %s", reason)

    def describe(self) -> str:
        """``on: udp/tcp 53 -> 127.0.0.1:5335, [::1]:5335`` or ``off: why``."""
        if self._plan is None:
            return f"off: {self.reason}"
        text = "on: udp/tcp 53 -> " + ", ".join(str(e) for e in self._plan.targets)
        return f"{text} ({'; '.join(self._plan.gaps)})" if self._plan.gaps else text
