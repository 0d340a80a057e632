"""Scenario 1: the lab's own libreswan peers do OE with each other across br-inet.

Why: before a router test blames the router, this proves the world is right: kernel ESP works
in the guests, pluto's OE groups trigger, and the captures see what is on the wire.
"""

from __future__ import annotations

import pytest

from lab import Lab

pytestmark = pytest.mark.qemu

A, B = "ls-a", "ls-b"  # private-or-clear initiator, clear-or-private responder


def whack(lab: Lab, netns: str, what: str) -> str:
    ctl = f"{lab.state_dir(netns)}/run/pluto.ctl"
    return lab.host(netns, f"ipsec whack --ctlsocket {ctl} {what}", timeout=30).check().stdout


def test_libreswan_oe_between_lab_peers_is_esp_on_the_wire(lab: Lab) -> None:
    """ls-a fetches ls-b's page: the flow is ESP on ls-a's bridge port, never cleartext HTTP.

    The capture sits on ls-a's bridge port (veth peer in the world's root netns), i.e. outside
    both IPsec stacks, so it shows frames exactly as on the wire in both directions; no
    decrypted packets are re-injected there (the trap LAB-NOTES describes for captures on an
    IPsec endpoint).
    """
    a, b = lab.plan.host(A), lab.plan.host(B)
    assert A not in lab.failed_hosts and B not in lab.failed_hosts, lab.failed_hosts
    with (
        lab.capture_host(A, label="selfcheck") as cap,
        lab.capture("eth0", netns=A, label="selfcheck-ls-a-out", direction="out") as out,
    ):
        # The first SYN meets libreswan's negotiation hold (dropped); TCP retransmits it.
        page = lab.host(A, f"curl -s -m 20 http://{b.ipv4}/", timeout=40).check().stdout
        traffic = whack(lab, A, "--trafficstatus")
    assert f"lab host {B}" in page
    assert b.ipv4 in traffic, f"no IPsec SA from {A} to {B}:\n{traffic}"
    esp = cap.count(f"esp and src {a.ipv4} and dst {b.ipv4}") + cap.count(
        f"esp and src {b.ipv4} and dst {a.ipv4}"
    )
    clear_http = cap.count("tcp port 80")
    assert esp >= 4, f"expected the HTTP exchange as ESP, saw {esp} ESP packets"
    assert clear_http == 0, f"{clear_http} cleartext HTTP packets leaked:\n{cap.text('tcp')}"
    assert cap.count("udp port 500 or udp port 4500") >= 2  # the IKE exchange itself
    # Same flow seen leaving ls-a's own stack (-Q out): ESP only, never a cleartext segment.
    assert out.count(f"esp and dst {b.ipv4}") >= 2
    assert out.count("tcp port 80") == 0, out.text("tcp")
