"""An ESP worker process of the userspace datapath: ``python -m oe_router.datapath.worker``.

Two roles, one process each, so sending and receiving run on different cores without
sharing a GIL:

* ``tx`` reads routed packets from the TUN device, finds the outbound SA by the packet's
  (source, destination), seals it (``esp.OutboundSa``) and sends it from the SA's ESP
  socket in UDP to the peer's NAT-T port (RFC 3948);
* ``rx`` receives ESP from the ESP sockets (the reuseport group's steering sends it
  here, see ``steering.py``), finds the inbound SA by SPI, checks replay, opens it,
  checks the inner packet against the SA's selectors (the kernel's inbound policy
  check) and writes it to the TUN device.

The data loops are plain blocking loops with everything they touch in locals; the
control channel (``workerctl``) is served by a second thread, which also copies the
SA counters into shared memory ten times a second and runs the engine canary. The
engine per packet comes from the daemon's choice table (fastest verified engine for
the transform and the packet's size); a canary failure moves live SAs to the next
engine at once and is reported to the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

from oe_router.logs import configure_logging
from oe_router.offload import TRANSFORMS, Engine, EngineError, EspCipher, Transform
from oe_router.records import record

from .esp import EspError, InboundSa, OutboundSa
from .workerctl import ControlError, SharedCounters, recv_message, send_message

log = logging.getLogger("oe_router.datapath")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_FLUSH_PERIOD = 0.1
_ANY = 1 << 30  # "any size" in a band
_EARLY_MAX = 64  # ESP datagrams kept for SPIs not installed yet, in all
_EARLY_FOR = 1.0  # seconds


def _nets(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def _exact_hosts(nets: tuple[IPNetwork, ...]) -> tuple[bytes, ...] | None:
    """The packed addresses when every selector is one host (OE's host-to-host case)."""
    if all(n.num_addresses == 1 for n in nets):
        return tuple(n.network_address.packed for n in nets)
    return None


class EngineSet:
    """The engines this worker made (by name) and the daemon's choice table."""

    def __init__(self, maker: Callable[[str], Engine]) -> None:
        self._make = maker
        self._engines: dict[str, Engine] = {}
        self.table: dict[str, Any] = {}
        self.failed: set[tuple[str, str]] = set()  # (engine, transform) the canary failed

    def engine(self, name: str) -> Engine:
        e = self._engines.get(name)
        if e is None:
            e = self._engines[name] = self._make(name)
        return e

    def plan(self, t: Transform) -> list[tuple[int, str]]:
        """[(max inner size, engine name)] for ``t`` from the daemon's choice table
        (``offload.chooser.ChoiceTable.to_json``); a band whose engine failed the canary
        goes to the next verified engine that did not; software is the last resort."""
        entry = self.table.get("transforms", {}).get(t.name, {})
        verified = [str(e) for e in entry.get("verified", ())]
        out: list[tuple[int, str]] = []
        for band in entry.get("bands", ()):
            name, upto = str(band["engine"]), band.get("max_size")
            if (name, t.name) in self.failed:
                name = next(
                    (e for e in [*verified, "software"] if (e, t.name) not in self.failed),
                    "software",
                )
            out.append((_ANY if upto is None else int(upto), name))
        if not out or out[-1][0] < _ANY:
            out.append((_ANY, "software"))
        return out

    def ciphers(self, t: Transform, encr: bytes, integ: bytes) -> list[tuple[int, str, EspCipher]]:
        out: list[tuple[int, str, EspCipher]] = []
        for upto, name in self.plan(t):
            try:
                out.append((upto, name, self.engine(name).cipher(t, encr, integ)))
            except EngineError as exc:
                log.warning("engine %s cannot run %s here: %s", name, t.name, exc)
                self.failed.add((name, t.name))
        if not out:
            out.append((_ANY, "software", self.engine("software").cipher(t, encr, integ)))
        return out


@record(eq=False)
class OutState:
    """One outbound SA in the tx worker."""

    slot: int
    sa: OutboundSa
    transform: Transform
    encr: bytes = field(repr=False)
    integ: bytes = field(repr=False)
    dest: tuple[str, int]
    src_ip: str
    local_ts: tuple[IPNetwork, ...]
    remote_ts: tuple[IPNetwork, ...]
    ciphers: list[tuple[int, str, EspCipher]] = field(default_factory=list, repr=False)
    sock: socket.socket | None = None
    last_use: float = 0.0
    dropped: int = 0


@record(eq=False)
class InState:
    """One inbound SA in the rx worker."""

    slot: int
    sa: InboundSa
    transform: Transform
    encr: bytes = field(repr=False)
    integ: bytes = field(repr=False)
    local_ts: tuple[IPNetwork, ...]
    remote_ts: tuple[IPNetwork, ...]
    ciphers: list[tuple[int, str, EspCipher]] = field(default_factory=list, repr=False)
    local_hosts: tuple[bytes, ...] | None = None
    remote_hosts: tuple[bytes, ...] | None = None
    last_use: float = 0.0
    dropped: int = 0
    #: True while the control thread feeds it the packets that came before it (early)
    draining: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Worker:
    """The state both roles share: SAs, sockets, engines, counters, control."""

    def __init__(
        self,
        role: str,
        ctl: socket.socket,
        tun_fd: int,
        counters: SharedCounters,
        maker: Callable[[str], Engine],
    ) -> None:
        self.role = role
        self.ctl = ctl
        self.tun_fd = tun_fd
        self.counters = counters
        self.engines = EngineSet(maker)
        self.socks: dict[str, socket.socket] = {}
        self.out_by_pair: dict[bytes, OutState] = {}
        self.out_by_slot: dict[int, OutState] = {}
        self.in_by_spi: dict[bytes, InState] = {}
        self.in_by_slot: dict[int, InState] = {}
        self.canary_interval = 0.0
        self.next_canary = 0.0
        self.lock = threading.Lock()  # control-thread writes vs. rx threads' reads of socks
        #: one seal at a time: the tx loop and the control thread (``send``: held first
        #: packets released into their SA) both send, and a cipher (its context, the SA's
        #: sequence number) is not for two threads at once; cipher swaps take it too
        self.send_lock = threading.Lock()
        self.stats = [0, 0, 0, 0]  # no SA, policy mismatch, send/write errors, other
        #: ESP for an SPI not installed yet, by SPI: a responder's peer may send its first
        #: packet the moment it has our IKE_AUTH answer, before our install is through
        self.early: dict[bytes, list[tuple[float, bytes]]] = {}
        self.early_count = 0
        self.running = True

    # ---------------------------------------------------------------- control
    def serve_control(self) -> None:
        self.ctl.settimeout(_FLUSH_PERIOD)
        send_message(self.ctl, {"ev": "ready", "role": self.role, "pid": os.getpid()})
        while self.running:
            try:
                msg, fds = recv_message(self.ctl)
            except TimeoutError:
                self._periodic()
                continue
            except (EOFError, ConnectionError, OSError):
                break
            except ControlError as exc:
                log.error("worker %s: %s", self.role, exc)
                continue
            try:
                self.handle(msg, fds)
            except Exception as exc:  # one bad message must not stop the datapath
                self._event({"ev": "error", "text": f"{msg.get('op')}: {exc}"})
            self._periodic()
        self.running = False
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon is gone: so is this worker

    def _event(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            send_message(self.ctl, msg)

    def _periodic(self) -> None:
        now = time.time()
        self.flush(now)
        if self.canary_interval > 0 and now >= self.next_canary:
            self.next_canary = now + self.canary_interval
            self.canary()

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "add_out":
            self._add_out(msg)
            self._event({"ev": "installed", "slot": int(msg["slot"])})
        elif op == "add_in":
            self._add_in(msg)
            self._event({"ev": "installed", "slot": int(msg["slot"])})
        elif op == "remove":
            self._remove(int(msg["slot"]))
        elif op == "engines":
            self.engines.table = msg["table"]
            self._rebuild_ciphers()
        elif op == "socket":
            self._socket(msg["ip"], fds)
        elif op == "close_socket":
            self._close_socket(msg["ip"])
        elif op == "send":
            st = self.out_by_slot.get(int(msg["slot"]))
            if st is not None:
                for hexed in msg["packets"]:
                    self.send_one(st, bytes.fromhex(hexed))
        elif op == "canary":
            self.canary_interval = float(msg["interval"])
            self.next_canary = time.time() + self.canary_interval
        elif op == "stop":
            self.running = False

    def _add_out(self, m: dict[str, Any]) -> None:
        t = TRANSFORMS[m["transform"]]
        encr, integ = bytes.fromhex(m["encr_key"]), bytes.fromhex(m["integ_key"])
        ciphers = self.engines.ciphers(t, encr, integ)
        sa = OutboundSa(int(m["spi"]), ciphers[-1][2], esn=bool(m["esn"]))
        local, remote = _nets(m["local_ts"]), _nets(m["remote_ts"])
        st = OutState(
            int(m["slot"]), sa, t, encr, integ, (m["dst"], int(m["port"])), m["src"], local,
            remote, ciphers, self.socks.get(m["src"]),
        )  # fmt: skip
        self.counters.clear(st.slot)
        with self.lock:
            self.out_by_slot[st.slot] = st
            lh, rh = _exact_hosts(local), _exact_hosts(remote)
            if lh is not None and rh is not None:
                for a in lh:
                    for b in rh:
                        self.out_by_pair[a + b] = st  # the newest SA of a pair wins (rekey)

    def _add_in(self, m: dict[str, Any]) -> None:
        t = TRANSFORMS[m["transform"]]
        encr, integ = bytes.fromhex(m["encr_key"]), bytes.fromhex(m["integ_key"])
        ciphers = self.engines.ciphers(t, encr, integ)
        sa = InboundSa(
            int(m["spi"]), ciphers[-1][2], esn=bool(m["esn"]), replay_window=int(m["window"])
        )
        local, remote = _nets(m["local_ts"]), _nets(m["remote_ts"])
        st = InState(
            int(m["slot"]), sa, t, encr, integ, local, remote, ciphers,
            _exact_hosts(local), _exact_hosts(remote),
        )  # fmt: skip
        self.counters.clear(st.slot)
        spi = int(m["spi"]).to_bytes(4, "big")
        with self.lock:
            early = self.early.pop(spi, [])
            self.early_count -= len(early)
            early = [e for e in early if time.monotonic() - e[0] < _EARLY_FOR]
            st.draining = bool(early)
            self.in_by_slot[st.slot] = st
            self.in_by_spi[spi] = st
        if early:  # the peer sent before we installed: those packets go first, in order
            with st.lock:
                for _, data in early:
                    self.rx_one(st, data)
                st.draining = False

    def _remove(self, slot: int) -> None:
        self.flush(time.time())
        with self.lock:
            out = self.out_by_slot.pop(slot, None)
            if out is not None:
                for k in [k for k, v in self.out_by_pair.items() if v is out]:
                    del self.out_by_pair[k]
                with self.send_lock:  # the tx loop may be sealing with them
                    for _, _, c in out.ciphers:
                        c.close()
            inb = self.in_by_slot.pop(slot, None)
            if inb is not None:
                for k in [k for k, v in self.in_by_spi.items() if v is inb]:
                    del self.in_by_spi[k]
                for _, _, c in inb.ciphers:
                    c.close()

    def _socket(self, ip: str, fds: list[int]) -> None:
        if not fds:
            raise ControlError("socket: no descriptor came with the message")
        for extra in fds[1:]:
            os.close(extra)
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(True)
        with self.lock:
            old = self.socks.pop(ip, None)
            self.socks[ip] = sock
            for st in self.out_by_slot.values():
                if st.src_ip == ip:
                    st.sock = sock
        if old is not None:
            _shut(old)
        if self.role == "rx":
            threading.Thread(target=self.rx_loop, args=(sock,), daemon=True).start()

    def _close_socket(self, ip: str) -> None:
        with self.lock:
            sock = self.socks.pop(ip, None)
            for st in self.out_by_slot.values():
                if st.src_ip == ip:
                    st.sock = None
        if sock is not None:
            _shut(sock)

    # ---------------------------------------------------------------- engines
    def _states(self) -> list[OutState | InState]:
        return [*self.out_by_slot.values(), *self.in_by_slot.values()]

    def _rebuild_ciphers(self) -> None:
        """New ciphers for every SA from the engine plan. An outbound SA's are swapped under
        ``send_lock`` and the old ones closed (no seal can hold them then); an inbound SA's
        old ciphers are left to the garbage collector, as an rx thread may be opening a
        packet with one right now (closing it under that thread killed the worker)."""
        for st in self._states():
            new = self.engines.ciphers(st.transform, st.encr, st.integ)
            if isinstance(st, OutState):
                with self.send_lock:
                    old, st.ciphers = st.ciphers, new
                    st.sa.cipher = new[-1][2]
                for _, _, c in old:
                    c.close()
            else:
                st.ciphers = new
                st.sa.cipher = new[-1][2]

    def canary(self) -> None:
        """Re-run the quick KAT on every (engine, transform) in use; a failure moves the
        live SAs off that engine now and tells the daemon."""
        from oe_router.offload.kat import run_kat

        in_use = {(name, st.transform.name) for st in self._states() for _, name, _ in st.ciphers}
        failed = False
        for name, tname in sorted(in_use):
            result = run_kat(self.engines.engine(name), TRANSFORMS[tname], quick=True)
            if not result.passed:
                failed = True
                self.engines.failed.add((name, tname))
                reason = "; ".join(result.failures)[:300] or "known-answer test failed"
                self._event(
                    {"ev": "canary_failed", "engine": name, "transform": tname, "reason": reason}
                )
        if failed:
            self._rebuild_ciphers()

    # ---------------------------------------------------------------- counters
    def flush(self, now: float) -> None:
        w = self.counters.write
        for st in list(self.out_by_slot.values()):
            s = st.sa
            w(st.slot, s.bytes, s.packets, 0, 0, st.dropped, s.seq, st.last_use)
        for ist in list(self.in_by_slot.values()):
            r = ist.sa
            w(
                ist.slot, r.bytes, r.packets, r.replay_errors + r.replay_window_errors,
                r.integrity_failures,
                ist.dropped + r.malformed, r.highest_seq, ist.last_use,
            )  # fmt: skip
        base = 0 if self.role == "tx" else 1
        no_sa, mismatch, io_errors, other = self.stats
        w(base, 0, 0, no_sa, mismatch, io_errors, other, now)

    # ---------------------------------------------------------------- data loops
    def send_one(self, st: OutState, pkt: bytes) -> None:
        with self.send_lock:
            ciphers = st.ciphers
            if len(ciphers) > 1:
                n = len(pkt)
                for upto, _, c in ciphers:
                    if n <= upto:
                        st.sa.cipher = c
                        break
            try:
                esp = st.sa.seal(pkt, 4 if pkt[0] >> 4 == 4 else 41)
            except EspError:
                st.dropped += 1
                return
        sock = st.sock
        if sock is None:
            st.dropped += 1
            return
        try:
            sock.sendto(esp, st.dest)
        except OSError:
            self.stats[2] += 1
            return
        st.last_use = time.time()

    def tx_loop(self) -> None:
        read, fd = os.read, self.tun_fd
        pairs, stats = self.out_by_pair, self.stats
        send_one = self.send_one
        while self.running:
            try:
                pkt = read(fd, 65536)
            except OSError:
                time.sleep(0.01)
                continue
            v = pkt[0] >> 4 if pkt else 0
            key = pkt[12:20] if v == 4 else pkt[8:40] if v == 6 else b""
            st = pairs.get(key)
            if st is None:
                st = self._slow_out(pkt, v)
                if st is None:
                    stats[0] += 1
                    continue
            send_one(st, pkt)

    def _slow_out(self, pkt: bytes, v: int) -> OutState | None:
        """An SA whose selectors are not single hosts: match them one by one."""
        if v not in (4, 6) or len(pkt) < (20 if v == 4 else 40):
            return None
        try:
            src = ipaddress.ip_address(pkt[12:16] if v == 4 else pkt[8:24])
            dst = ipaddress.ip_address(pkt[16:20] if v == 4 else pkt[24:40])
        except ValueError:
            return None
        for st in list(self.out_by_slot.values()):
            if any(src in n for n in st.local_ts) and any(dst in n for n in st.remote_ts):
                return st
        return None

    def rx_loop(self, sock: socket.socket) -> None:
        recvfrom, write, fd = sock.recvfrom, os.write, self.tun_fd
        by_spi, stats = self.in_by_spi, self.stats
        while self.running:
            try:
                data, _addr = recvfrom(65536)
            except OSError:
                return  # closed or shut down: a new socket has its own thread
            if not data:
                if self.socks.get(_ip_of(sock)) is not sock:
                    return
                continue
            st = by_spi.get(data[:4])
            if st is None:
                self._early(data)
                continue
            if st.draining:
                with st.lock:
                    self.rx_one(st, data)
                continue
            ciphers = st.ciphers
            if len(ciphers) > 1:
                n = len(data)
                for upto, _, c in ciphers:
                    if n <= upto:
                        st.sa.cipher = c
                        break
            try:
                _nh, inner = st.sa.open(data)
            except EspError:
                continue  # counted by the SA (replay, integrity, malformed, dummy)
            if not _inner_ok(st, inner):
                stats[1] += 1
                st.dropped += 1
                continue
            try:
                write(fd, inner)
            except OSError:
                stats[2] += 1
                continue
            st.last_use = time.time()

    def _early(self, data: bytes) -> None:
        """Keep ESP for an unknown SPI a moment (bounded): its SA may be on its way."""
        now = time.monotonic()
        with self.lock:
            if self.early_count >= _EARLY_MAX:
                for spi in list(self.early):
                    kept = [e for e in self.early[spi] if now - e[0] < _EARLY_FOR]
                    self.early_count -= len(self.early[spi]) - len(kept)
                    if kept:
                        self.early[spi] = kept
                    else:
                        del self.early[spi]
            if self.early_count >= _EARLY_MAX or len(data) < 8:
                self.stats[0] += 1
                return
            self.early.setdefault(data[:4], []).append((now, data))
            self.early_count += 1

    def rx_one(self, st: InState, data: bytes) -> None:
        """The receive path for one datagram (the loop inlines the same steps)."""
        n = len(data)
        for upto, _, c in st.ciphers:
            if n <= upto:
                st.sa.cipher = c
                break
        try:
            _nh, inner = st.sa.open(data)
        except EspError:
            return
        if not _inner_ok(st, inner):
            self.stats[1] += 1
            st.dropped += 1
            return
        try:
            os.write(self.tun_fd, inner)
        except OSError:
            self.stats[2] += 1
            return
        st.last_use = time.time()


def _inner_ok(st: InState, pkt: bytes) -> bool:
    """The kernel's inbound policy check: inner source in the remote selectors and
    inner destination in the local ones; anything else is not this SA's to carry."""
    v = pkt[0] >> 4 if pkt else 0
    if v == 4 and len(pkt) >= 20:
        src, dst = pkt[12:16], pkt[16:20]
    elif v == 6 and len(pkt) >= 40:
        src, dst = pkt[8:24], pkt[24:40]
    else:
        return False
    if st.remote_hosts is not None and st.local_hosts is not None:
        return src in st.remote_hosts and dst in st.local_hosts
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return any(s in n for n in st.remote_ts) and any(d in n for n in st.local_ts)


def _ip_of(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname()[0])
    except OSError:
        return ""


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked in recvfrom on ``sock`` (close alone would not) and close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _warm(worker: Worker) -> None:
    """Import the software engine (and ``cryptography``) now, before the first SA: done
    lazily it put up to 0.2 s into the first Child SA's install, inside a held answer."""
    t = TRANSFORMS["aes128gcm16"]
    worker.engines.engine("software").cipher(t, bytes(t.encr_key_len)).close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="oe_router.datapath.worker")
    ap.add_argument("role", choices=("tx", "rx"))
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--tun-fd", type=int, required=True)
    ap.add_argument("--counters-fd", type=int, required=True)
    ap.add_argument("--syslog", metavar="PATH", help="log to syslog through PATH, as the daemon")
    args = ap.parse_args(argv)
    if args.syslog:
        configure_logging(syslog=args.syslog)
    else:
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format=f"%(levelname)s oe-esp-{args.role}: %(message)s",
        )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    from oe_router.offload import make_engine

    ctl = socket.socket(fileno=args.control_fd)
    worker = Worker(args.role, ctl, args.tun_fd, SharedCounters(args.counters_fd), make_engine)
    _warm(worker)
    if args.role == "tx":
        threading.Thread(target=worker.serve_control, daemon=True).start()
        worker.tx_loop()
    else:
        worker.serve_control()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
