"""Our own initiator and responder ``IkeSa`` talking by hand: datagrams passed in
memory (no sockets), time passed in as a value. The pair's configs, shuttling between
them (lossy or with crossed requests where a test needs it), running their timers,
establishing it, draining its events, and reading what it sent: the one copy every
sans-IO IKE test (the SA, its exchanges, fragments, policy, PFS, the OE manager's
negotiations) drives the pair with. Only ``IkeSa``'s public API is used.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random as stdlib_random
from collections.abc import Callable
from typing import Any

from oe_router.ike.crypto import sk_cipher
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaEstablished
from oe_router.ike.message import Message, decrypt
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import Address, IkeSa, IkeSaConfig

I_ADDR = ("192.0.2.1", 500)
R_ADDR = ("198.51.100.7", 500)


def host_ts(addr: str) -> TrafficSelector:
    a = ipaddress.ip_address(addr)
    return TrafficSelector.from_range(a, a)


def net(text: str) -> TrafficSelector:
    return TrafficSelector.for_network(text)


def config(local: Address, remote: Address, **kw: Any) -> IkeSaConfig:
    """One side's config: traffic selectors for the two hosts themselves."""
    return IkeSaConfig(local, remote, (host_ts(local[0]),), (host_ts(remote[0]),), **kw)


def configs(**both: Any) -> tuple[IkeSaConfig, IkeSaConfig]:
    return config(I_ADDR, R_ADDR, **both), config(R_ADDR, I_ADDR, **both)


def replace(cfg: IkeSaConfig, **kw: Any) -> IkeSaConfig:
    return dataclasses.replace(cfg, **kw)


def seeded(seed: int) -> Callable[[int], bytes]:
    return stdlib_random.Random(seed).randbytes


def shuttle(
    ini: IkeSa, res: IkeSa, now: float = 0.0, *, drop: int = 0, crossed: bool = False
) -> None:
    """Pass datagrams both ways, initiator's first, until both sides are quiet.

    ``drop``: lose the first ``drop`` datagrams the responder sends (a lost response).
    ``crossed``: first, both sides' pending datagrams are on the wire before either is
    delivered (simultaneous requests: the collisions of RFC 7296 2.8.1/2.8.2).
    """
    if crossed:
        to_res, to_ini = ini.datagrams_to_send(), res.datagrams_to_send()
        for d in to_res:
            res.receive_datagram(d, now, I_ADDR)
        for d in to_ini:
            ini.receive_datagram(d, now, R_ADDR)
    for _ in range(100):
        to_res = ini.datagrams_to_send()
        for d in to_res:
            res.receive_datagram(d, now, I_ADDR)
        to_ini = res.datagrams_to_send()
        for d in to_ini:
            if drop:
                drop -= 1
                continue
            ini.receive_datagram(d, now, R_ADDR)
        if not to_res and not to_ini:
            return
    raise AssertionError("the two IKE SAs never went quiet")


def run_until(ini: IkeSa, res: IkeSa, start: float, end: float) -> float:
    """Advance time from timer to timer, shuttling datagrams, until ``end``."""
    now = start
    shuttle(ini, res, now)
    while True:
        timers = [t for t in (ini.get_timer(), res.get_timer()) if t is not None]
        if not timers or min(timers) > end:
            return now
        now = max(now, min(timers))
        ini.handle_timer(now)
        res.handle_timer(now)
        shuttle(ini, res, now)


def events(sa: IkeSa) -> list[Event]:
    out = []
    while (e := sa.next_event()) is not None:
        out.append(e)
    return out


def handshake(
    ini_cfg: IkeSaConfig, res_cfg: IkeSaConfig, seed: int | None = None
) -> tuple[IkeSa, IkeSa, list[Event], list[Event]]:
    """Start the pair at t=0 and shuttle until quiet, whatever the outcome: the two SAs
    and the events each reported (for tests of handshakes that must fail, too)."""
    rnd_i = seeded(seed) if seed is not None else None
    rnd_r = seeded(seed + 1000) if seed is not None else None
    ini = IkeSa.initiator(ini_cfg, 0.0, rnd_i) if rnd_i else IkeSa.initiator(ini_cfg, 0.0)
    res = IkeSa.responder(res_cfg, rnd_r) if rnd_r else IkeSa.responder(res_cfg)
    shuttle(ini, res)
    return ini, res, events(ini), events(res)


def establish(
    ini_cfg: IkeSaConfig, res_cfg: IkeSaConfig, seed: int | None = None
) -> tuple[IkeSa, IkeSa, ChildSaEstablished, ChildSaEstablished]:
    """A handshake that must succeed: IKE SA and first Child SA up on both sides."""
    ini, res, ie, re = handshake(ini_cfg, res_cfg, seed)
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaEstablished], ie
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaEstablished], re
    ic, rc = ie[1], re[1]
    assert isinstance(ic, ChildSaEstablished) and isinstance(rc, ChildSaEstablished)
    assert ini.state == res.state == "established"
    return ini, res, ic, rc


def assert_mirror(a: ChildSaEstablished, b: ChildSaEstablished) -> None:
    """Two sides' views of one Child SA: SPIs and keys crossed over."""
    assert (a.spi_in, a.spi_out) == (b.spi_out, b.spi_in)
    assert (a.encr_key_in, a.integ_key_in) == (b.encr_key_out, b.integ_key_out)
    assert (a.encr_key_out, a.integ_key_out) == (b.encr_key_in, b.integ_key_in)
    assert a.encr_key_in != a.encr_key_out
    assert (a.ts_local, a.ts_remote) == (b.ts_remote, b.ts_local)


def pairs(sa: IkeSa) -> set[tuple[bytes, bytes]]:
    return {(c.spi_in, c.spi_out) for c in sa.child_sas()}


def mirrored(sa: IkeSa) -> set[tuple[bytes, bytes]]:
    return {(c.spi_out, c.spi_in) for c in sa.child_sas()}


def open_request(sender: IkeSa, datagram: bytes) -> Message:
    """Decrypt a request ``sender`` sent, with its public key accessor."""
    k = sender.negotiated_keys()
    assert k is not None
    cipher = sk_cipher(k.encr, k.encr_key_bits, k.integ)
    ek, ak = (k.keys.sk_ei, k.keys.sk_ai) if sender.is_initiator else (k.keys.sk_er, k.keys.sk_ar)
    return decrypt(datagram, cipher, ek, ak)
