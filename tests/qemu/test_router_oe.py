"""The product end to end in the QEMU lab: oe-routerd on the router image, real kernel ESP,
libreswan and strongSwan peers, a LAN client with curl and dig.

Why these assertions: each one is read from packets on a cable, never from the daemon's own
claims alone. The WAN capture sits on the router's WAN cable (world side), the LAN capture on
the client's cable; both run in the world VM, so their timestamps share one clock and the
order "tunnel up, then DNS answer, then the first SYN" is measured, not assumed.

The daemon runs with identity @router.example.test and the world bundle's key (installed at
run time, not baked into the image): strongSwan (no NULL auth) authenticates us by that key;
libreswan's OE responders take only NULL auth from initiators, so towards them the router
falls back to NULL after AUTHENTICATION_FAILED, which test_oe_up_libreswan_rsa shows directly.

Issues: 6 (DNS-triggered, first tests), 5 (packet-triggered LAN flow), 4 (`oe up` interop).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import oelab
from lab import Lab
from labkit import peers, world

pytestmark = pytest.mark.qemu

ROUTER_ID = "@router.example.test"
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-oe.json"


def ike_row(lab: Lab, addr: str) -> dict[str, Any]:
    doc = oelab.status(lab)
    rows = [t for t in doc["tunnels"] if t.get("source") == "ike" and t["peer"] == addr]
    rows = [t for t in rows if t["state"] == "established" and t.get("children")]
    assert rows, f"no established IKE SA with {addr} in oe status:\n{json.dumps(doc['tunnels'])}"
    return rows[0]


def trafficstatus(lab: Lab, netns: str) -> str:
    ctl = f"{lab.state_dir(netns)}/run/pluto.ctl"
    return lab.host(netns, f"ipsec whack --ctlsocket {ctl} --trafficstatus").check().stdout


WAN4 = "203.0.113.2"

# (netns, name, our auth seen by the peer, the peer's auth as we verified it)
KEYED = [
    ("oe-null", "null.example.test", "null", "null"),
    ("oe-rsa", "rsa.example.test", "null", "digital_signature(RSA-2048)"),
    ("oe-sw", "sw.example.test", "digital_signature(ECDSA-P256)", "digital_signature(ECDSA-P256)"),
]


def swanctl(lab: Lab, args: str, timeout: float = 40) -> str:
    """`swanctl <args>` against oe-sw's charon (chrooted in its own mount namespace)."""
    st = lab.state_dir("oe-sw")
    res = lab.host(
        "oe-sw",
        f"nsenter -t $(cat {st}/charon.pid) -m chroot /opt/swroot "
        f"swanctl {args} --uri unix://{st}/charon.vici",
        timeout=timeout,
    )
    assert res.ok, f"swanctl {args}: {res.stdout}{res.stderr}"
    return res.stdout


def test_charon_initiates_to_router_key_found_by_its_name(
    oe_lab: Lab, interop: oelab.Interop, request: pytest.FixtureRequest
) -> None:
    """Issue 15 item 3: strongSwan's charon (ID_FQDN sw.example.test, ECDSA key) initiates
    to our WAN address. This runs first in the module, so the daemon holds no key for the
    address: our responder holds IKE_AUTH, validates sw.example.test's IPSECKEY through the
    DNS front (knot's signed zone, the lab's trust anchor), verifies charon's signature with
    it and answers; a ping from the host to the router crosses the WAN as ESP only."""
    lab = oe_lab
    assert "oe-sw" not in lab.failed_hosts, lab.failed_hosts
    a = lab.plan.host("oe-sw").ipv4
    st = lab.state_dir("oe-sw")
    conf = peers.render_swanctl_initiator(
        a, WAN4, world.SW_FQDN, world.ROUTER_FQDN, "sw.pub", "router.pub"
    )
    lab.host("oe-sw", f"cat > {st}/swanctl/initiate.conf <<'EOF'\n{conf}EOF").check()
    try:
        swanctl(lab, f"--load-conns --file {st}/swanctl/initiate.conf")
        with lab.capture_wan(label="wan-charon-initiates") as wan:
            swanctl(lab, "--initiate --child to-router --timeout 30", timeout=60)
            ping = lab.host("oe-sw", f"ping -n -c 3 -W 2 {WAN4}", timeout=30)
        row = ike_row(lab, a)
        said = [ln for ln in oelab.daemon_log(lab).splitlines() if f"IKE_AUTH from {a} as" in ln]
    finally:
        lab.host(
            "oe-sw",
            f"nsenter -t $(cat {st}/charon.pid) -m chroot /opt/swroot swanctl --terminate "
            f"--ike to-router --uri unix://{st}/charon.vici; "
            f"nsenter -t $(cat {st}/charon.pid) -m chroot /opt/swroot swanctl --load-conns "
            f"--file {st}/swanctl/swanctl.conf --uri unix://{st}/charon.vici",
            timeout=40,
        )
        oelab.oe(lab, f"down {a}")
    assert ping.ok, ping.stdout + ping.stderr
    assert said and f"as {world.SW_FQDN}: key found" in said[0], said
    assert row["role"] == "responder", row
    ecdsa = "digital_signature(ECDSA-P256)"
    assert (row["local_auth"], row["remote_auth"]) == (ecdsa, ecdsa), row
    assert row["remote_id"] == f"@{world.SW_FQDN}", row
    assert row["children"][0]["ts_remote"] == f"{a}/32", row
    assert wan.count(f"host {a} and icmp") == 0, wan.text(f"host {a} and icmp")
    assert wan.count(f"esp and src {a}") >= 3 and wan.count(f"esp and dst {a}") >= 3
    interop.record(request.node.nodeid, "strongswan", "oe-sw", row)


@pytest.mark.parametrize(("netns", "name", "local_auth", "remote_auth"), KEYED)
def test_keyed_name_tunnel_before_answer_first_syn_is_esp(
    oe_lab: Lab,
    figures: dict[str, Any],
    interop: oelab.Interop,
    request: pytest.FixtureRequest,
    netns: str,
    name: str,
    local_auth: str,
    remote_auth: str,
) -> None:
    """Issue 6: `curl http://<name>/` from the LAN; the IPSECKEY (alg 0 = NULL auth, RSA,
    ECDSA) is DNSSEC-validated, the tunnel is built, and only then is the A answer released:
    the client's one and only SYN leaves the router as ESP (0 retransmissions, 0 cleartext)."""
    lab = oe_lab
    assert netns not in lab.failed_hosts, lab.failed_hosts
    a = lab.plan.host(netns).ipv4
    with (
        lab.capture("eth0", netns="client", label=f"lan-{netns}") as lan,
        lab.capture_wan(label=f"wan-{netns}") as wan,
    ):
        res = lab.client(
            "curl -s -m 20 -o /dev/null -w '%{http_code} %{remote_ip} %{time_namelookup} "
            f"%{{time_connect}}' http://{name}/",
            timeout=40,
        ).check()
    code, remote_ip, t_dns, t_connect = res.stdout.split()
    assert code == "200", res.stdout
    assert remote_ip == a, f"curl went to {remote_ip}, not the host's IPv4 {a}"

    flow = oelab.first_flow(lab, lan, wan, a, WAN4)
    assert not flow.problems(), flow.problems()
    syns, esp_out, esp_in = flow.syns, flow.esp_out, flow.esp_in
    ike = wan.packets(f"host {a} and (udp port 500 or (udp port 4500 and udp[8:4] = 0))")
    assert ike, f"no IKE with {a} on the WAN: the tunnel was not built for this query"
    answers = lan.packets(f"src {lab.plan.router_lan4} and udp src port 53")
    answer_a = [t for t, ln in answers if " A " in ln and a in ln]
    assert answer_a, "no A answer on the LAN:\n" + "\n".join(ln for _, ln in answers)
    queries = lan.packets(f"dst {lab.plan.router_lan4} and udp dst port 53")
    ike_done = max(t for t, ln in ike if f"{a}." in ln.split(">")[0])  # last IKE from the peer
    assert ike_done < answer_a[0] < syns[0][0] <= esp_out[0][0], (
        f"order: IKE done {ike_done:.3f}, answer {answer_a[0]:.3f}, SYN {syns[0][0]:.3f}, "
        f"first ESP {esp_out[0][0]:.3f}"
    )
    row = ike_row(lab, a)
    assert (row["local_auth"], row["remote_auth"]) == (local_auth, remote_auth), row
    assert row["children"][0]["ts_remote"] == f"{a}/32"
    if netns != "oe-sw":
        assert WAN4 in trafficstatus(lab, netns)
    else:
        st = lab.state_dir("oe-sw")  # charon runs chrooted in its own mount namespace
        sas = lab.host(
            netns,
            f"nsenter -t $(cat {st}/charon.pid) -m chroot /opt/swroot "
            f"swanctl --list-sas --uri unix://{st}/charon.vici",
        )
        assert WAN4 in sas.stdout, sas.stdout + sas.stderr
    figures[name] = {
        "answer_ms": round((answer_a[0] - queries[0][0]) * 1000, 1),
        "ike_packets": len(ike),
        "esp_out": len(esp_out),
        "esp_in": len(esp_in),
        "curl_namelookup_s": float(t_dns),
        "curl_connect_s": float(t_connect),
        "ike": row["transform"],
        "esp": row["children"][0]["transform"],
        "auth": f"{row['local_auth']}/{row['remote_auth']}",
    }
    peer = "strongswan" if netns == "oe-sw" else "libreswan"
    interop.record(request.node.nodeid, peer, netns, row)


def test_plain_name_is_fetched_in_the_clear(oe_lab: Lab, figures: dict[str, Any]) -> None:
    """Issue 6: no IPSECKEY (secure denial): the answer is released at once, no ESP at all."""
    lab = oe_lab
    plain = lab.plan.host("plain")
    with lab.capture_wan(label="wan-plain") as wan:
        res = lab.client(
            "curl -s -m 20 -w '\\n%{remote_ip}' http://plain.example.test/", timeout=40
        ).check()
    assert "lab host plain" in res.stdout
    used = res.stdout.strip().splitlines()[-1]
    assert used in (plain.ipv4, plain.ipv6)
    assert wan.count(f"host {used} and tcp port 80") >= 4
    assert wan.count(f"host {plain.ipv4} and esp") == 0
    figures["plain.example.test"] = {"address": used, "clear_packets": wan.count("tcp port 80")}


def test_bogus_name_gets_servfail_and_no_traffic(oe_lab: Lab) -> None:
    """Issue 6: a bogus IPSECKEY answer (bad signature) is refused: SERVFAIL, no connection."""
    lab = oe_lab
    bogus = lab.plan.host("bogus").ipv4
    with lab.capture_wan(label="wan-bogus") as wan:
        dig = lab.client("dig +time=5 +tries=1 www.bogus.test A", timeout=30)
        curl = lab.client("curl -s -m 10 http://www.bogus.test/", timeout=30)
    assert "status: SERVFAIL" in dig.stdout, dig.stdout
    assert curl.rc != 0 and "lab host" not in curl.stdout
    assert wan.count(f"host {bogus}") == 0


def test_packet_triggered_lan_flow_to_libreswan_is_esp(
    oe_lab: Lab, figures: dict[str, Any]
) -> None:
    """Issue 5: the LAN client connects by address (no DNS, so no hold): the forwarded SYN,
    source-NATed to the WAN address, hits the private-or-clear trap, the ACQUIRE makes a
    NULL-auth SA with libreswan's clear-or-private host, and the flow leaves as ESP with 0
    cleartext packets. The first SYN is lost while IKE runs (the kernel's larval drop) and
    TCP resends it; the count is reported."""
    lab = oe_lab
    b = lab.plan.host("ls-b").ipv4
    assert "ls-b" not in lab.failed_hosts
    with (
        lab.capture("eth0", netns="client", label="lan-ls-b") as lan,
        lab.capture_wan(label="wan-ls-b") as wan,
    ):
        res = lab.client(
            f"curl -4 -s -m 20 -w '\\n%{{time_connect}}' http://{b}/", timeout=40
        ).check()
    assert "lab host ls-b" in res.stdout
    assert wan.count(f"host {b} and tcp") == 0, wan.text(f"host {b} and tcp")
    esp = wan.count(f"esp and host {b}")
    assert esp >= 8, esp
    assert WAN4 in trafficstatus(lab, "ls-b")
    syns = lan.count(f"dst {b} and tcp[tcpflags] == tcp-syn")
    figures["packet-trigger ls-b"] = {
        "esp": esp,
        "client_syns": syns,
        "connect_s": float(res.stdout.strip().splitlines()[-1]),
    }


def _rsa_pem(lab: Lab) -> Path:
    """oe-rsa's public key (libreswan `0s` RFC 3110 form in the bundle) as a PEM file."""
    text = (lab.run_dir / "bundle" / "hosts" / "oe-rsa" / "hostkey.pub").read_text().strip()
    blob = base64.b64decode(text.removeprefix("0s"))
    elen = blob[0]
    e, n = int.from_bytes(blob[1 : 1 + elen], "big"), int.from_bytes(blob[1 + elen :], "big")
    pem = (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    path = lab.run_dir / "oe-rsa.pem"
    path.write_bytes(pem)
    return path


def _up_and_traffic(lab: Lab, netns: str, up_args: str) -> tuple[dict[str, Any], int]:
    a = lab.plan.host(netns).ipv4
    oelab.oe(lab, f"down {a}")  # a fresh IKE SA for this test (ok if there was none)
    with lab.capture_wan(label=f"wan-up-{netns}") as wan:
        up = oelab.oe(lab, f"up {a} {up_args}")
        assert up.rc == 0, up.stdout + up.stderr
        page = lab.client(f"curl -4 -s -m 20 http://{a}/", timeout=40).check().stdout
    assert f"lab host {netns}" in page
    assert wan.count(f"host {a} and udp port 500") >= 4  # IKE_SA_INIT + IKE_AUTH both ways
    assert wan.count(f"host {a} and tcp") == 0
    return ike_row(lab, a), wan.count(f"esp and host {a}")


def test_oe_up_libreswan_null(
    oe_lab: Lab, figures: dict[str, Any], interop: oelab.Interop, request: pytest.FixtureRequest
) -> None:
    """Issue 4: `oe up` with NULL auth to libreswan's authby=null OE host; both sides list
    the SA (our `oe status`, pluto's --trafficstatus) and traffic to it is ESP."""
    row, esp = _up_and_traffic(oe_lab, "oe-null", "--auth null")
    assert (row["local_auth"], row["remote_auth"], row["remote_id"]) == ("null", "null", "%null")
    status = trafficstatus(oe_lab, "oe-null")
    assert WAN4 in status and "ID_NULL" in status, status
    assert esp >= 8
    figures["oe up oe-null"] = {"ike": row["transform"], "esp_packets": esp}
    interop.record(request.node.nodeid, "libreswan", "oe-null", row)


def test_oe_up_libreswan_rsa(
    oe_lab: Lab, figures: dict[str, Any], interop: oelab.Interop, request: pytest.FixtureRequest
) -> None:
    """Issue 4: libreswan's IPSECKEY-RSA host. Its OE conn takes only NULL auth from an
    initiator (rightauth=null), so `--auth pubkey` is refused with AUTHENTICATION_FAILED;
    `--auth null` with its RSA key verifies the peer's RFC 7427 signature."""
    lab = oe_lab
    pem = _rsa_pem(lab)
    a = lab.plan.host("oe-rsa").ipv4
    oelab.oe(lab, f"down {a}")
    refused = oelab.oe(lab, f"up {a} --auth pubkey --peer-key /lab/{pem.name}")
    assert refused.rc != 0 and "notify 24" in refused.stderr, refused.stdout + refused.stderr
    row, esp = _up_and_traffic(lab, "oe-rsa", f"--auth null --peer-key /lab/{pem.name}")
    assert row["remote_auth"] == "digital_signature(RSA-2048)", row
    assert row["remote_id"] == "@rsa.example.test", row
    assert WAN4 in trafficstatus(lab, "oe-rsa")
    assert esp >= 8
    figures["oe up oe-rsa"] = {"ike": row["transform"], "esp_packets": esp}
    interop.record(request.node.nodeid, "libreswan", "oe-rsa", row)


def test_oe_status_says_which_datapath_and_why(oe_lab: Lab) -> None:
    doc = oelab.status(oe_lab)
    assert doc["daemon"]["datapath"].startswith("kernel-xfrm (kernel has ESP"), doc["daemon"]
    assert doc["daemon"]["services"] == ["offload", "esp-offer", "oe", "ike", "dns"]
    assert doc["dns"]["oe_manager"] == "connected"
