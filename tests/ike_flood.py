"""IKE_SA_INIT floods for tests: many source addresses, a bounded rate, COOKIEs answered.

A flood is one UDP socket: ``IP_PKTINFO`` on each ``sendmsg`` picks the source address
(any address of the host or namespace, e.g. 1,000 of them, or all of 127/8), so no
socket per source. Every request is a real initiator's IKE_SA_INIT (our own ``IkeSa``
made it) with a new SPIi; with ``answer_cookies`` a COOKIE demand is answered at once
with that request carrying the cookie, as a bot that does the work would (RFC 7296
§2.6), which gets it past the cookie and into the responder's half-open table.

Shared by the unit tier (loopback, a thread) and the host tier (``python -m
tests.ike_flood`` inside a network namespace, JSON counts on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from oe_router.ike.constants import IKE_VERSION, ExchangeType, HeaderFlag, NotifyType, PayloadType
from oe_router.ike.message import Message
from oe_router.ike.payloads import GenericHeader, IkeHeader, Notify
from oe_router.ike.sa import IkeSa
from tests.ike_pair import config

_IP_PKTINFO = 8  # linux/in.h
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_SPI = struct.Struct("!Q")


def request_template(local: str, remote: str) -> bytes:
    """An IKE_SA_INIT request from our initiator (SA, KE, Ni, NAT-D ...), no cookie."""
    (first,) = IkeSa.initiator(config((local, 500), (remote, 500)), 0.0).datagrams_to_send()
    return first


def with_cookie(request: bytes, cookie: bytes) -> bytes:
    """``request`` with N(COOKIE) as its first payload (RFC 7296 §2.6)."""
    hdr = IkeHeader.decode(request[:28])
    body = bytes([0, 0]) + NotifyType.COOKIE.to_bytes(2, "big") + cookie
    notify = GenericHeader(hdr.next_payload, 0, 4 + len(body)).encode() + body
    rest = request[28:]
    head = IkeHeader(
        hdr.spi_i, hdr.spi_r, PayloadType.NOTIFY, IKE_VERSION, ExchangeType.IKE_SA_INIT,
        HeaderFlag.INITIATOR, 0, 28 + len(notify) + len(rest),
    )  # fmt: skip
    return head.encode() + notify + rest


def cookie_demand(reply: bytes) -> tuple[bytes, bytes] | None:
    """(SPIi, cookie) when ``reply`` is HDR, N(COOKIE); else None."""
    try:
        msg = Message.decode(reply)
    except Exception:
        return None
    first = msg.payloads[0] if msg.payloads else None
    if isinstance(first, Notify) and first.notify_type == NotifyType.COOKIE:
        return msg.spi_i, first.data
    return None


@dataclass
class Flood:
    """``sources`` send new IKE_SA_INIT requests to ``target``, ``rate`` a second in all,
    round robin, for as long as it runs; counts what went out and came back."""

    sources: list[str]
    target: tuple[str, int]
    rate: float
    template: bytes
    answer_cookies: bool = False
    sent: int = 0
    cookies_received: int = 0
    cookies_answered: int = 0
    send_errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        ancillary = (socket.IPPROTO_IP, _IP_PKTINFO)
        self._pktinfo = [
            [(*ancillary, _PKTINFO.pack(0, socket.inet_aton(a), bytes(4)))] for a in self.sources
        ]
        self._index = {socket.inet_aton(s): i for i, s in enumerate(self.sources)}

    def run(self, seconds: float) -> None:
        """Flood for ``seconds`` (or until ``stop``), in the calling thread."""
        buf = bytearray(self.template)
        tag = (os.getpid() & 0xFFFF) << 40
        start = time.monotonic()
        end = start + seconds
        n = len(self.sources)
        while not self._stop.is_set() and (now := time.monotonic()) < end:
            due = int((now - start) * self.rate) - self.sent
            for _ in range(min(due, 200)):
                i = self.sent % n
                _SPI.pack_into(buf, 0, tag + self.sent + 1)
                self._send(buf, i)
                self.sent += 1
            self._drain()
            if due <= 0:
                time.sleep(min(0.002, max(0.0, start + (self.sent + 1) / self.rate - now)))

    def _send(self, data: bytes | bytearray, source: int) -> None:
        try:
            self.sock.sendmsg([data], self._pktinfo[source], 0, self.target)
        except OSError:
            self.send_errors += 1

    def _drain(self) -> None:
        while True:
            try:
                reply, anc, _, _ = self.sock.recvmsg(4096, 64)
            except (BlockingIOError, InterruptedError):
                return
            if not self.answer_cookies:
                self.cookies_received += 1
                continue
            demand = cookie_demand(reply)
            if demand is None:
                continue  # an IKE_SA_INIT response: the half-open SA is ours, never continued
            self.cookies_received += 1
            # the address the demand was sent to is the source that asked
            to = next((_PKTINFO.unpack(d[: _PKTINFO.size])[2] for *_, d in anc), None)
            source = self._index.get(to) if to is not None else None
            if source is None:
                continue
            spi, cookie = demand
            request = bytearray(self.template)
            request[:8] = spi
            self._send(with_cookie(bytes(request), cookie), source)
            self.cookies_answered += 1

    def start(self, seconds: float) -> Flood:
        self._thread = threading.Thread(target=self.run, args=(seconds,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
        return self.counts()

    def counts(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "cookies_received": self.cookies_received,
            "cookies_answered": self.cookies_answered,
            "send_errors": self.send_errors,
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.ike_flood TARGET PORT --sources FILE --rate N --seconds S``:
    flood until S seconds pass or stdin closes; print the counts as JSON."""
    ap = argparse.ArgumentParser(prog="ike_flood")
    ap.add_argument("target")
    ap.add_argument("port", type=int)
    ap.add_argument("--sources", required=True, help="file: one source address a line")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--answer-cookies", action="store_true")
    args = ap.parse_args(argv)
    with open(args.sources) as f:
        sources = [line.strip() for line in f if line.strip()]
    flood = Flood(
        sources,
        (args.target, args.port),
        args.rate,
        request_template(sources[0], args.target),
        args.answer_cookies,
    )
    flood.start(args.seconds)
    print("started", flush=True)

    def until_stdin_closes() -> None:
        sys.stdin.read()
        flood._stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    assert flood._thread is not None
    flood._thread.join()
    print(json.dumps(flood.stop()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
