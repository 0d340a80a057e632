"""Forwarding client: ask the upstream resolvers, UDP first, TCP when truncated.

Why its own module: the DNS front (client queries) and the key lookup (IPSECKEY and
the DNSSEC chain) both need answers from the same upstreams with the same timeouts,
retries and fallback. Each UDP query goes out from its own connected socket (a fresh
random source port) with a fresh random ID, and only a reply with that ID and the
same question is taken: an off-path spoofer must guess both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import field
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode

from oe_router.config.schema import BadValue, Endpoint, parse_endpoint
from oe_router.records import record

__all__ = [
    "ResolvConfSource",
    "StaticSource",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamSettings",
    "UpstreamStats",
    "answers",
    "parse_resolv_conf",
]

log = logging.getLogger("oe_router.dns.upstream")

_HEADER = 12
_TC = 0x0200  # header flag bit: truncated
_QR = 0x8000
_LEN = struct.Struct("!H")  # RFC 7766 two-octet length prefix
_ID = struct.Struct("!H")  # the header's first field
_QTAIL = 4  # QTYPE and QCLASS after a question's name


class UpstreamError(Exception):
    """No upstream gave a usable answer; the message names each upstream and why."""


@record(frozen=True)
class UpstreamSettings:
    """Timeouts per attempt; every upstream is tried ``tries`` times within ``budget``."""

    timeout: float = 1.0
    tcp_timeout: float = 2.0
    tries: int = 2
    #: Stub resolvers give up after about 5 s; an answer later than that helps nobody.
    budget: float = 4.0
    #: SO_MARK on every upstream socket (0: none): the DNS capture lets marked queries
    #: through, so the front's own never loop back into it (capture.py).
    mark: int = 0


@record
class UpstreamStats:
    queries: int = 0
    udp_timeouts: int = 0
    tcp_fallbacks: int = 0
    errors: int = 0
    fallbacks: int = 0
    failed: int = 0
    #: replies ignored because their ID or question is not the query's (spoofing, or late)
    mismatched: int = 0
    per_server: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "upstream_queries": self.queries,
            "upstream_udp_timeouts": self.udp_timeouts,
            "upstream_tcp_fallbacks": self.tcp_fallbacks,
            "upstream_errors": self.errors,
            "upstream_fallbacks": self.fallbacks,
            "upstream_failed": self.failed,
            "upstream_mismatched": self.mismatched,
        }


def parse_resolv_conf(
    text: str, source: str = "resolv.conf", exclude: Sequence[Endpoint] = ()
) -> tuple[tuple[Endpoint, ...], list[str]]:
    """``nameserver`` lines as endpoints (port 53), and one problem line per bad entry.

    ``exclude`` drops our own listen addresses, so the front never forwards to itself.
    """
    servers: list[Endpoint] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        address = words[1].split("%", 1)[0]  # drop an IPv6 zone index
        try:
            endpoint = parse_endpoint(address)
        except BadValue as exc:
            problems.append(f"{source}:{number}: nameserver {words[1]!r} {exc}")
            continue
        if endpoint not in exclude and endpoint not in servers:
            servers.append(endpoint)
    return tuple(servers), problems


class StaticSource:
    """Upstreams named in the config (``oe.dns.upstream``)."""

    def __init__(self, servers: Sequence[Endpoint]) -> None:
        self._servers = tuple(servers)

    def servers(self) -> tuple[Endpoint, ...]:
        return self._servers

    def describe(self) -> str:
        return "oe.dns.upstream"


class ResolvConfSource:
    """Upstreams from a resolv.conf that OpenWrt rewrites when the WAN comes up.

    The file is re-read when its mtime or size changes, checked at most every
    ``recheck`` seconds, so a WAN reconnect needs no reload.
    """

    def __init__(
        self,
        path: str,
        exclude: Sequence[Endpoint] = (),
        recheck: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._exclude = tuple(exclude)
        self._recheck = recheck
        self._clock = clock
        self._checked = -1e18
        self._stamp: tuple[int, int] | None = None
        self._servers: tuple[Endpoint, ...] = ()

    def servers(self) -> tuple[Endpoint, ...]:
        now = self._clock()
        if now - self._checked >= self._recheck:
            self._checked = now
            self._refresh()
        return self._servers

    def describe(self) -> str:
        return self.path

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None or self._servers:
                log.warning("upstreams: cannot read %s: %s", self.path, exc.strerror or exc)
            self._stamp, self._servers = None, ()
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            text = Path(self.path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            log.warning("upstreams: cannot read %s: %s", self.path, exc.strerror or exc)
            self._servers = ()
            return
        servers, problems = parse_resolv_conf(text, self.path, self._exclude)
        for problem in problems:
            log.warning("upstreams: %s (skipped)", problem)
        if servers != self._servers:
            log.info("upstreams from %s: %s", self.path, ", ".join(map(str, servers)) or "none")
        self._servers = servers


def _question_end(wire: bytes) -> int:
    """Offset just past the first question (name + type + class), or -1."""
    pos = _HEADER
    while pos < len(wire):
        length = wire[pos]
        if length == 0:
            end = pos + 1 + 4
            return end if end <= len(wire) else -1
        if length & 0xC0:
            return -1  # compression in a query's question: not worth supporting
        pos += 1 + length
    return -1


def answers(query: bytes, reply: bytes, qend: int) -> bool:
    """Whether ``reply`` is the response to ``query`` (whose question ends at ``qend``).

    Same ID, QR set, same question count, and the first question echoed: the name
    equal ignoring ASCII case (servers may echo a 0x20-mixed name), QTYPE and QCLASS
    equal byte for byte (lower-casing those turned type 65 into 97).
    """
    if len(reply) < qend or reply[:2] != query[:2]:
        return False
    if not _LEN.unpack_from(reply, 2)[0] & _QR or reply[4:6] != query[4:6]:
        return False
    name_end = qend - _QTAIL
    if reply[name_end:qend] != query[name_end:qend]:
        return False
    # label lengths of a query's name are below 0x40, never a letter, so only the
    # labels' letters are folded
    return reply[_HEADER:name_end].lower() == query[_HEADER:name_end].lower()


class UpstreamClient:
    """Sends one query to the upstreams and returns the first usable response.

    Order: the upstream that answered last goes first, the others follow in
    configured order; the whole list is tried ``settings.tries`` times.
    A REFUSED or SERVFAIL reply moves on to the next upstream and is returned
    only if nobody does better.
    """

    def __init__(
        self,
        source: StaticSource | ResolvConfSource,
        settings: UpstreamSettings | None = None,
        stats: UpstreamStats | None = None,
    ) -> None:
        self.source = source
        self.settings = settings or UpstreamSettings()
        self.stats = stats or UpstreamStats()
        self._preferred: Endpoint | None = None

    def servers(self) -> tuple[Endpoint, ...]:
        return self.source.servers()

    async def resolve(self, message: dns.message.Message) -> dns.message.Message:
        """Message in, message out (for the key lookup); raises UpstreamError."""
        wire = await self.query(message.to_wire())
        try:
            return dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:
            raise UpstreamError(f"unparsable upstream reply: {exc}") from None

    async def query(self, wire: bytes) -> bytes:
        """Forward a query in wire format; the reply carries the query's own ID."""
        self.stats.queries += 1
        qend = _question_end(wire)
        if len(wire) < _HEADER or qend < 0:
            raise UpstreamError("query has no question the upstreams could be asked")
        servers = list(self.source.servers())
        if not servers:
            self.stats.failed += 1
            raise UpstreamError(f"no upstream resolvers ({self.source.describe()} names none)")
        if self._preferred in servers:
            servers.remove(self._preferred)
            servers.insert(0, self._preferred)
        original_id = wire[:2]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.budget
        problems: dict[str, str] = {}
        fallback: bytes | None = None
        attempt = 0
        for _round in range(max(1, self.settings.tries)):
            for server in servers:
                left = deadline - loop.time()
                if left <= 0:
                    break
                if attempt:
                    self.stats.fallbacks += 1
                attempt += 1
                try:
                    reply = await self._one(server, wire, qend, left)
                except UpstreamError as exc:
                    problems[str(server)] = str(exc)
                    continue
                rcode = reply[3] & 0x0F
                if rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                    problems[str(server)] = f"answered {dns.rcode.to_text(dns.rcode.Rcode(rcode))}"
                    fallback = reply
                    continue
                self._preferred = server
                return original_id + reply[2:]
        if fallback is not None:
            return original_id + fallback[2:]
        self.stats.failed += 1
        detail = "; ".join(f"{s}: {why}" for s, why in problems.items()) or "time budget spent"
        raise UpstreamError(f"no upstream answered ({detail})")

    async def _one(self, server: Endpoint, wire: bytes, qend: int, left: float) -> bytes:
        query_id = secrets.randbits(16)
        wire = _ID.pack(query_id) + wire[2:]
        reply = await self._udp(server, wire, qend, min(self.settings.timeout, left))
        flags = _LEN.unpack_from(reply, 2)[0]
        if flags & _TC:
            self.stats.tcp_fallbacks += 1
            reply = await self._tcp(server, wire, qend, min(self.settings.tcp_timeout, left))
        return reply

    async def _udp(self, server: Endpoint, wire: bytes, qend: int, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if server.family == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            self._mark(sock)
            sock.connect((server.host, server.port))
            sock.send(wire)
            deadline = loop.time() + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
                if answers(wire, reply, qend):
                    return reply
                self.stats.mismatched += 1
                log.debug("upstream %s: ignored a reply that does not match the query", server)
        except TimeoutError:
            self.stats.udp_timeouts += 1
            raise UpstreamError(f"no UDP reply within {timeout:.2f}s") from None
        except OSError as exc:
            self.stats.errors += 1
            raise UpstreamError(f"UDP: {exc.strerror or exc}") from None
        finally:
            sock.close()

    def _mark(self, sock: socket.socket) -> None:
        if self.settings.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.settings.mark)

    async def _connect(self, server: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not self.settings.mark:
            return await asyncio.open_connection(server.host, server.port)
        family = socket.AF_INET6 if server.family == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            self._mark(sock)
            await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _tcp(self, server: Endpoint, wire: bytes, qend: int, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await self._connect(server)
                try:
                    writer.write(_LEN.pack(len(wire)) + wire)
                    await writer.drain()
                    while True:
                        (size,) = _LEN.unpack(await reader.readexactly(2))
                        reply = await reader.readexactly(size)
                        if answers(wire, reply, qend):
                            return reply
                        self.stats.mismatched += 1
                finally:
                    writer.close()
        except TimeoutError:
            raise UpstreamError(f"no TCP reply within {timeout:.2f}s") from None
        except asyncio.IncompleteReadError:
            self.stats.errors += 1
            raise UpstreamError("TCP connection closed before the reply") from None
        except OSError as exc:
            self.stats.errors += 1
            raise UpstreamError(f"TCP: {exc.strerror or exc}") from None
