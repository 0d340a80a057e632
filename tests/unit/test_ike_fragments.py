"""Bounded RFC 7383 reassembly: the limits of one message, one IKE SA and one endpoint.

Sans-IO first (the reassembler alone, then two of our IKE SAs passing datagrams by
hand with time as a value), then the endpoint over loopback UDP with its counters.
Fragments a hostile peer would send are sealed with real keys (``tests.ike_peer``),
so every one of them is authentic and only the limits stop them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable

import pytest

from oe_router.ike.constants import EncrId, ExchangeType
from oe_router.ike.crypto import sk_cipher
from oe_router.ike.endpoint import IkeEndpoint
from oe_router.ike.errors import IkeCryptoError
from oe_router.ike.fragments import FragmentBudget, FragmentLimits, FragmentReassembler
from oe_router.ike.message import Message
from oe_router.ike.payloads import IDi, Nonce, Notify, Payload
from oe_router.ike.sa import IkeSa, IkeSaConfig
from tests.ike_pair import I_ADDR, R_ADDR, config, configs, establish, host_ts, shuttle
from tests.ike_peer import sealed_fragment

CIPHER = sk_cipher(EncrId.AES_GCM_16, 256, None)
KE = bytes(range(36))
LIMITS = FragmentLimits()


def fragments(mid: int, flags: int, payloads: list[Payload], size: int = 200) -> list[bytes]:
    """A message sealed with the test keys, as SKF fragments of at most ``size`` bytes."""
    msg = Message(b"i" * 8, b"r" * 8, ExchangeType.INFORMATIONAL, flags, mid, payloads)
    return msg.encrypt_fragments(CIPHER, KE, b"", [bytes([n]) * 8 for n in range(1, 60)], size)


def forge(datagram: bytes) -> bytes:
    bad = bytearray(datagram)
    bad[-1] ^= 1
    return bytes(bad)


# --------------------------------------------------------------------------- one message


def test_absurd_total_is_refused_before_any_decryption() -> None:
    """Total Fragments 65535: dropped on sight. The fragment is forged too, and no
    IkeCryptoError comes back: no decryption was spent on it."""
    (frag,) = fragments(5, 0x08, [Notify.status(16384)], size=1000)
    whole = bytearray(frag)
    whole[34:36] = (65535).to_bytes(2, "big")  # Total Fragments (IKE header, SKF header, #)
    r = FragmentReassembler(CIPHER, KE, b"")
    assert r.add(forge(bytes(whole)), 0.0) is None
    assert (r.buffered, r.stats.dropped, r.stats.abandoned) == (0, 1, 0)
    assert "65535 fragments announced" in r.stats.reason


def test_one_sa_never_holds_more_than_its_byte_limit() -> None:
    """2000 authentic fragments of messages that never complete: what is held stays
    under ``max_sa_bytes``; a message that would pass it is abandoned whole."""
    limits = FragmentLimits(max_sa_bytes=16 * 1024)
    r = FragmentReassembler(CIPHER, KE, b"", limits)
    msg = Message(b"i" * 8, b"r" * 8, ExchangeType.INFORMATIONAL, 0x08, 3)
    most = 0
    for n in range(2000):
        frag = msg.encrypt_fragment(
            CIPHER, KE, b"", n.to_bytes(8, "big"), bytes(900), n % 254 + 1, 255, 41
        )
        assert r.add(frag, float(n) / 1000) is None
        most = max(most, r.buffered)
    assert most <= limits.max_sa_bytes
    # each abandoned message held what fits, plus the one fragment that did not
    assert r.stats.abandoned >= 2000 // (limits.max_sa_bytes // len(frag) + 1) - 1
    assert r.stats.dropped == r.stats.abandoned


def test_a_request_and_a_response_in_progress_do_not_mix() -> None:
    """Fragments of the peer's request (ID 4) and of its response to ours (ID 9), with the
    same Total Fragments and interleaved, reassemble into the two messages they are."""
    req_payloads: list[Payload] = [Notify.status(16384, b"q" * 300)]
    resp_payloads: list[Payload] = [Nonce(b"r" * 300)]
    req, resp = fragments(4, 0x08, req_payloads), fragments(9, 0x28, resp_payloads)
    assert len(req) == len(resp) > 1
    r = FragmentReassembler(CIPHER, KE, b"")
    done = [m for pair in zip(req, resp, strict=True) for f in pair if (m := r.add(f)) is not None]
    assert [(m.message_id, m.is_response, m.payloads) for m in done] == [
        (4, False, req_payloads),
        (9, True, resp_payloads),
    ]
    assert r.buffered == 0 and not r.stats


def test_a_forged_fragment_disturbs_nothing_held() -> None:
    """Forged fragments, even one announcing more fragments (which would restart an
    authentic reassembly, RFC 7383 §2.6), leave what is held alone."""
    inner: list[Payload] = [IDi(1, b"\x0a\x00\x00\x01"), Nonce(b"n" * 500)]
    frags = fragments(2, 0x08, inner)
    r = FragmentReassembler(CIPHER, KE, b"")
    assert r.add(frags[0]) is None
    held = r.buffered
    bigger = fragments(2, 0x08, inner, size=120)  # a re-fragmentation: more fragments
    for forged in (forge(frags[1]), forge(bigger[3])):
        with pytest.raises(IkeCryptoError):
            r.add(forged)
    assert r.buffered == held and r.stats.dropped == 2
    results = [r.add(f) for f in frags[1:]]
    assert results[-1] is not None and results[-1].payloads == inner
    # an authentic re-fragmentation (more, smaller fragments) starts over and completes
    assert r.add(frags[0]) is None
    assert [r.add(f) for f in bigger][-1] is not None and r.buffered == 0


# --------------------------------------------------------------------------- one IKE SA


def test_an_incomplete_message_on_an_established_sa_is_freed_after_the_timeout() -> None:
    """A CREATE_CHILD_SA request in fragments, the last one lost: held, with a timer at
    first fragment + timeout; then dropped and counted. The retransmission completes."""
    ini, res, _, _ = establish(*configs(fragment_size=256))
    ini.create_child((host_ts(I_ADDR[0]),), (host_ts(R_ADDR[0]),), now=1.0)
    frags = ini.datagrams_to_send()
    assert len(frags) > 2
    for f in frags[:-1]:
        res.receive_datagram(f, 1.0, I_ADDR)
    assert res.fragment_bytes == sum(map(len, frags[:-1]))
    assert res.get_timer() == 1.0 + LIMITS.timeout
    res.handle_timer(1.0 + LIMITS.timeout - 0.01)
    assert res.fragment_bytes > 0
    res.handle_timer(1.0 + LIMITS.timeout)
    assert res.fragment_bytes == 0 and res.get_timer() is None
    stats = res.take_fragment_stats()
    assert (stats.dropped, stats.abandoned) == (0, 1) and "incomplete after 30 s" in stats.reason
    ini.handle_timer(40.0)  # the initiator retransmits every fragment
    shuttle(ini, res, 40.0)
    assert len(ini.child_sas()) == 2 and res.fragment_bytes == 0


def test_a_retransmitted_fragment_set_of_an_answered_request_rebuilds_nothing() -> None:
    ini, res, _, _ = establish(*configs(fragment_size=256))
    ini.create_child((host_ts(I_ADDR[0]),), (host_ts(R_ADDR[0]),), now=1.0)
    frags = ini.datagrams_to_send()
    for f in frags:
        res.receive_datagram(f, 1.0, I_ADDR)
    answer = res.datagrams_to_send()
    assert answer and len(res.child_sas()) == 2
    for f in frags:  # the whole set again: only fragment 1 replays the answer
        res.receive_datagram(f, 2.0, I_ADDR)
        assert res.fragment_bytes == 0
    assert res.datagrams_to_send() == answer
    assert len(res.child_sas()) == 2 and not res.take_fragment_stats()


def test_fragments_outside_the_window_are_dropped_and_counted() -> None:
    """Authentic fragments for message IDs the window does not hold: a request ahead of
    the next one expected, a response to a request we never sent."""
    ini, res, _, _ = establish(*configs())
    for mid, response in ((7, False), (3, True)):
        for n in (1, 2):
            frag = sealed_fragment(ini, mid, n, 3, bytes(100), response=response)
            res.receive_datagram(frag, 1.0, I_ADDR)
    assert res.fragment_bytes == 0 and res.get_timer() is None
    stats = res.take_fragment_stats()
    assert stats.dropped == 4 and "outside the window" in stats.reason


def test_a_half_open_flood_stays_bounded_and_the_handshake_still_completes() -> None:
    """The peer finished IKE_SA_INIT and sends 3000 authentic IKE_AUTH fragments (1 KB
    each, 255 announced, never the last) instead of its IKE_AUTH: what the responder holds
    stays under the IKE SA's limit. Its real IKE_AUTH afterwards still establishes."""
    ini_cfg, res_cfg = configs()
    ini, res = IkeSa.initiator(ini_cfg, 0.0), IkeSa.responder(res_cfg)
    (init,) = ini.datagrams_to_send()
    res.receive_datagram(init, 0.0, I_ADDR)
    for d in res.datagrams_to_send():
        ini.receive_datagram(d, 0.0, R_ADDR)
    auth = ini.datagrams_to_send()  # held back until the flood is over
    most = 0
    for n in range(3000):
        frag = sealed_fragment(ini, 1, n % 254 + 1, 255, bytes(1000), ExchangeType.IKE_AUTH)
        res.receive_datagram(frag, n / 1000, I_ADDR)
        most = max(most, res.fragment_bytes)
    assert 0 < most <= LIMITS.max_sa_bytes
    stats = res.take_fragment_stats()
    assert stats.abandoned >= 3000 // (LIMITS.max_sa_bytes // len(frag) + 1) - 1
    for d in auth:
        res.receive_datagram(d, 3.0, I_ADDR)
    assert res.state == "established"
    for d in res.datagrams_to_send():
        ini.receive_datagram(d, 3.0, R_ADDR)
    assert ini.state == "established" and len(ini.child_sas()) == 1
    res.handle_timer(3.0 + LIMITS.timeout)  # the flood's last partial message times out
    assert res.fragment_bytes == 0


# --------------------------------------------------------------------------- the endpoint


def test_budget_takes_back_from_the_biggest_holder_and_rate_limits_reports() -> None:
    budget: FragmentBudget[str] = FragmentBudget(
        FragmentLimits(max_sa_bytes=100, max_total_bytes=250)
    )
    budget.hold("a", 100)
    budget.hold("b", 60)
    budget.hold("c", 80)
    assert budget.victim() is None and budget.held == 240
    budget.hold("b", 90)
    assert budget.held == 270 and budget.victim() == "a"
    budget.hold("a", 0)
    assert budget.victim() is None and budget.held == 170
    one = dataclasses.replace(budget._unlogged, dropped=1, reason="x")
    assert budget.report(one, 0.0) is not None  # the first report is due at once
    for t in (1.0, 5.0, 9.9):
        assert budget.report(dataclasses.replace(one), t) is None  # within the interval
    due = budget.report(dataclasses.replace(one, reason="last"), 10.0)
    assert due is not None and (due.dropped, due.reason) == (4, "last")


def test_endpoint_keeps_all_sas_under_the_total_and_counts_what_it_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three established peers over loopback flood authentic fragments: the responder
    endpoint never holds more than its total (taking bytes back from the biggest holder),
    counts the drops, logs one line, and a fourth peer still establishes."""

    async def main() -> None:
        limits = FragmentLimits(max_sa_bytes=20_000, max_total_bytes=40_000)

        def policy(local: tuple[str, int], remote: tuple[str, int]) -> IkeSaConfig:
            return config(local, remote)

        res = IkeEndpoint(
            ["127.0.0.1"], on_event=lambda h, e: None, responder_policy=policy,
            clock=time.monotonic, ike_port=0, natt_port=0, fragment_limits=limits,
        )  # fmt: skip
        ini = IkeEndpoint(
            ["127.0.0.1"], on_event=lambda h, e: None,
            clock=time.monotonic, ike_port=0, natt_port=0,
        )  # fmt: skip
        await res.start()
        await ini.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            target = ("127.0.0.1", res.ike_port)

            def initiate() -> IkeSa:
                cfg = config(("127.0.0.1", ini.ike_port), target)
                return ini.initiate(cfg, remote_natt_port=res.natt_port).sa

            async def until(cond: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 10
                while not cond():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.01)

            def received(n: int) -> Callable[[], bool]:
                return lambda: res.counters.received >= n

            peers = [initiate() for _ in range(3)]
            await until(lambda: all(p.state == "established" for p in peers), "three peers up")
            most = sent = 0
            started = time.monotonic()
            for n in range(60):
                for p in peers:
                    sock.sendto(sealed_fragment(p, 2, n % 250 + 1, 251, bytes(1500)), target)
                    sent += 1
                await until(received(6 + sent), f"{sent} fragments in")
                most = max(most, res.fragments.held)
            assert 0 < most <= limits.max_total_bytes
            c = res.counters
            assert c.fragment_messages_abandoned >= 60 * 3 * 1500 // limits.max_total_bytes
            over = sealed_fragment(peers[0], 2, 1, limits.max_fragments + 1, bytes(10))
            sock.sendto(over, target)
            await until(lambda: c.fragments_dropped == 1, "a fragment of too many dropped")
            lines = [r for r in caplog.records if "IKE fragments from 127.0.0.1" in r.message]
            most_lines = 1 + int((time.monotonic() - started) / 10)  # one per 10 s at most
            assert 1 <= len(lines) <= most_lines, [r.message for r in lines]
            fourth = initiate()
            await until(lambda: fourth.state == "established", "a fourth peer up")
        finally:
            sock.close()
            await ini.stop()
            await res.stop()

    caplog.set_level(logging.WARNING, logger="oe_router.ike")
    asyncio.run(main())
