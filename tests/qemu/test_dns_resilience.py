"""LAN DNS that cannot break (issue 13): the DNS front captures dnsmasq's forwards while it
runs, and the router keeps answering the LAN whenever it does not.

The session lab's dnsmasq keeps its own upstreams, here two of them (the lab resolver's
IPv4 and IPv6 addresses), so a SERVFAIL retried at the other server would show. While
oe-routerd runs, its owned nftables table (inet oe_dns) redirects both to the front. The
LAN client asks the router's LAN address with one try and a 2 s timeout (``dig +tries=1
+time=2``): an answer there is an answer without a client retry. ``www.bogus.test`` (bad
signature in the lab world) tells who answered: the front says SERVFAIL, the resolver
the name's address. The daemon goes away four ways: ``/etc/init.d/oe stop``, ``kill -9``
(asked at once, before procd respawns it), a broken /etc/config/oe (it refuses to start);
the package removed is tests/qemu/test_opkg_live.py. Each test leaves the daemon running
with its capture on; the module's end puts the lab's dnsmasq back as the session had it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "test-results" / "qemu-dns-resilience.json"
ROUTER_ID = "%null"
BOGUS = "www.bogus.test"
CANARY = "use-application-dns.net"
PLAIN = "a.example.test"  #: signed, no key: answered at once through the front


def dig(lab: Lab, name: str) -> oelab.LanAnswer:
    return oelab.lan_query(lab, name)


def capture_on(lab: Lab) -> bool:
    return lab.router(f"nft list table inet {oelab.CAPTURE_TABLE} >/dev/null").rc == 0


def wait_capture(lab: Lab, timeout: float = 90) -> float:
    """Until the daemon (procd's instance) runs with its capture on; returns the wait."""
    t0 = time.monotonic()

    def ready() -> bool | None:
        if not capture_on(lab):
            return None
        capture = oelab.status(lab).get("dns", {}).get("capture", "")
        return True if capture.startswith("on:") else None

    oelab.wait_until("oe-routerd with its DNS capture on", ready, timeout=timeout, pause=0.2)
    return time.monotonic() - t0


def two_upstreams(lab: Lab, extra: str = "") -> None:
    """dnsmasq with the resolver's two addresses as upstreams and no cache (every query
    forwarded); ``extra``: more switches (how it picks among them)."""
    resolver = lab.plan.host("resolver")
    oelab.restart_dnsmasq(lab, [resolver.ipv4, resolver.ipv6], cache=0, extra=extra)


@pytest.fixture(scope="module")
def dns_lab(oe_lab: Lab) -> Iterator[Lab]:
    """The daemon running, dnsmasq with two upstreams; oe_lab's stop_daemon gives the
    session its dnsmasq back."""
    lab = oe_lab
    two_upstreams(lab)
    yield lab
    lab.router("/etc/init.d/oe start")  # whatever a failed test left: running for stop_daemon


#: how dnsmasq picks among its servers: its default (the fastest, retrying another on
#: SERVFAIL or REFUSED), every server at once, and strictly in order
PICKS = {"default": "", "all-servers": "--all-servers", "strict-order": "--strict-order"}


@pytest.mark.parametrize("pick", PICKS)
def test_with_the_front_up_a_bogus_name_gets_servfail_from_either_upstream(
    dns_lab: Lab, figures: dict[str, Any], pick: str
) -> None:
    lab = dns_lab
    two_upstreams(lab, PICKS[pick])
    log_file = lab.run_dir / "logs" / "router-dnsmasq.log"
    seen = len(log_file.read_text(errors="replace"))
    assert capture_on(lab)
    before = oelab.status(lab)["dns"]
    assert before["capture"] == "on: udp/tcp 53 -> 127.0.0.1:5335, [::1]:5335", before
    plain = dig(lab, PLAIN)
    assert plain.status == "NOERROR" and plain.addresses, plain.out
    answers = [dig(lab, BOGUS) for _ in range(5)]
    assert all(a.status == "SERVFAIL" and not a.addresses for a in answers), [
        a.out for a in answers
    ]
    after = oelab.status(lab)["dns"]
    # every query (and any retry of dnsmasq's at its other upstream) reached the front
    assert after["queries"] >= before["queries"] + 6, (before, after)
    assert after["servfail"] >= before["servfail"] + 5, (before, after)
    log = log_file.read_text(errors="replace")[seen:]
    figures[pick] = {
        "bogus_forwarded_to": sorted(set(re.findall(rf"forwarded {BOGUS} to (\S+)", log))),
        "front_queries_for_6_lan_queries": after["queries"] - before["queries"],
    }
    two_upstreams(lab)


def test_the_doh_canary_gets_nxdomain_from_the_lan(dns_lab: Lab) -> None:
    lab = dns_lab
    before = oelab.status(lab)["dns"]["doh_canary"]
    answer = dig(lab, CANARY)
    assert answer.status == "NXDOMAIN", answer.out
    assert oelab.status(lab)["dns"]["doh_canary"] >= before + 1


def _answered_directly(lab: Lab) -> oelab.LanAnswer:
    """The bogus name from the LAN now: the resolver's answer, on the first try."""
    bogus = lab.plan.host("bogus").ipv4
    answer = dig(lab, BOGUS)
    assert answer.status == "NOERROR" and answer.addresses == [bogus], answer.out
    return answer


def test_daemon_stopped(dns_lab: Lab, figures: dict[str, Any]) -> None:
    lab = dns_lab
    lab.router("/etc/init.d/oe stop").check()
    answer = _answered_directly(lab)
    assert not capture_on(lab)
    # procd's stop signals the instance and returns; the daemon finishes its clean stop
    # (its capture went first, above) on its own time, a moment more on a loaded box
    oelab.wait_until(
        "oe-routerd gone after /etc/init.d/oe stop",
        lambda: lab.router("pgrep -x oe-routerd").rc != 0 or None,
        15,
    )
    figures["stopped_answer_ms"] = answer.ms
    lab.router("/etc/init.d/oe start").check()
    figures["start_to_capture_s"] = round(wait_capture(lab), 1)
    assert dig(lab, BOGUS).status == "SERVFAIL"


def test_kill_9_answered_before_procd_respawns(dns_lab: Lab, figures: dict[str, Any]) -> None:
    lab = dns_lab
    pid = lab.router("pgrep -x oe-routerd").check().stdout.split()[0]
    lab.router(f"kill -9 {pid}").check()
    t0 = time.monotonic()
    answer = _answered_directly(lab)
    asked_s = time.monotonic() - t0
    after = lab.router("pgrep -x oe-routerd").stdout.split()
    figures["kill9"] = {
        "answer_ms": answer.ms,
        "asked_after_kill_s": round(asked_s, 2),
        "daemon_back_when_answered": bool(after) and after != [pid],
    }
    assert not capture_on(lab) or after, "the table outlived the killed daemon"
    figures["kill9"]["respawn_to_capture_s"] = round(wait_capture(lab), 1)
    assert lab.router("pgrep -x oe-routerd").check().stdout.split() != [pid]
    assert dig(lab, BOGUS).status == "SERVFAIL"


def test_broken_config_daemon_refuses_to_start_dns_still_answers(
    dns_lab: Lab, figures: dict[str, Any]
) -> None:
    lab = dns_lab
    lab.router("cp /etc/config/oe /tmp/oe.good").check()
    try:
        lab.router(
            "/etc/init.d/oe stop; uci set oe.ike.retransmit_tries=77 && uci commit oe && "
            "/etc/init.d/oe start"
        ).check()
        oelab.wait_until(
            "oe-routerd to refuse the broken config",
            lambda: "oe.ike.retransmit_tries: '77'" in oelab.daemon_log(lab) or None,
            timeout=60,
        )
        answer = _answered_directly(lab)
        assert not capture_on(lab)
        figures["broken_config_answer_ms"] = answer.ms
    finally:
        lab.router("cp /tmp/oe.good /etc/config/oe; /etc/init.d/oe restart").check()
    wait_capture(lab)
    assert dig(lab, BOGUS).status == "SERVFAIL"
