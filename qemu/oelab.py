"""Turning the product on in a booted lab: oe-routerd on the router, dnsmasq pointed at its DNS
front, the router's identity installed from the world bundle (never baked into the image).

Used by demo.py and the tests in tests/qemu; each step fails with one message naming what is
missing. ``source`` runs the daemon from a copy of src/ on the 9p share instead of the image's
installed package (for quick development loops only; the tests use the image).

``libreswan_ipv6_twin`` gives a libreswan host an IPv6 twin of its IPv4 OE conn for a
test's duration (libreswan OE conns have one address family; the shipped lab has IPv4 ones).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lab import LAB_STATE, Lab, LabError
from labkit import peers

DNS_FRONT = "127.0.0.1#5335"  # the DNS front's default listen address in files/etc/config/oe
REPO = Path(__file__).resolve().parents[1]
LOG = "/lab/logs/oe-routerd.log"


def _dnsmasq(lab: Lab, server: str, cache: int) -> None:
    lab.router(
        "kill $(cat /run/dnsmasq.pid) 2>/dev/null; sleep 0.3; "
        f"dnsmasq --conf-file=/dev/null --interface=lan --bind-dynamic --no-resolv "
        f"--server={server} --proxy-dnssec --cache-size={cache} --pid-file=/run/dnsmasq.pid "
        "--user=root --log-queries --log-facility=/lab/logs/router-dnsmasq.log"
    ).check()


def router_config(local_id: str = "%null") -> str:
    """The shipped /etc/config/oe with the router's IKE identity set."""
    text = (REPO / "files" / "etc" / "config" / "oe").read_text()
    return text.replace("option local_id '%null'", f"option local_id '{local_id}'")


def start_daemon(
    lab: Lab, *, local_id: str = "%null", source: bool = False, timeout: float = 30
) -> dict[str, Any]:
    """Install trust anchor and identity, start oe-routerd, switch dnsmasq to its DNS front.

    Returns the first `oe status --json` document; raises LabError naming what failed.
    """
    info = lab.world_info.get("router", {})
    ta, key = info.get("trust_anchor_ds"), info.get("identity_key")
    if not ta or not key:
        raise LabError("the world bundle names no router trust anchor / identity key")
    (lab.run_dir / "oe.conf").write_text(router_config(local_id))
    prefix = ""
    if source:
        shutil.copytree(REPO / "src", lab.run_dir / "src", dirs_exist_ok=True)
        prefix = "PYTHONPATH=/lab/src "
    lab.router(
        "mkdir -p /etc/oe /tmp/resolv.conf.d /var/run/oe; "
        f"echo 'nameserver {lab.plan.resolver}' > /tmp/resolv.conf.d/resolv.conf.auto; "
        f"cp /lab/bundle/{ta} /etc/oe/root.key; "
        f"install -m 600 /lab/bundle/{key} /etc/oe/private.pem; "
        "cp /lab/oe.conf /etc/config/oe"
    ).check()
    lab.router(
        f"{prefix}nohup oe-routerd --config /etc/config/oe >>{LOG} 2>&1 </dev/null & "
        "echo $! > /run/oe-routerd.pid"
    ).check()
    status: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = lab.router(f"{prefix}oe status --json", timeout=20)
        if res.ok:
            status = json.loads(res.stdout)
            break
        if lab.router("kill -0 $(cat /run/oe-routerd.pid)").rc != 0:
            break
        time.sleep(0.3)
    if status is None:
        tail = "\n    ".join(daemon_log(lab).strip().splitlines()[-10:])
        raise LabError(f"oe-routerd did not start or did not answer `oe status`:\n    {tail}")
    # `oe status` answers once the control socket is up; the DNS front is the last service
    # to start, so wait for it too (under load it came up a few seconds later)
    while lab.router("ss -lnu | grep -q '127.0.0.1:5335 '").rc != 0:
        if time.monotonic() > deadline:
            raise LabError("oe-routerd's DNS front does not listen on 127.0.0.1:5335")
        time.sleep(0.3)
    # As OpenWrt does it: uci add_list dhcp.@dnsmasq[0].server='127.0.0.1#5335'. No cache:
    # every query reaches the front, so every keyed name gets its tunnel before the answer.
    _dnsmasq(lab, DNS_FRONT, 0)
    return status


def oe(lab: Lab, args: str, source: bool = False, timeout: float = 60) -> Any:
    prefix = "PYTHONPATH=/lab/src " if source else ""
    return lab.router(f"{prefix}oe {args}", timeout=timeout)


def status(lab: Lab, source: bool = False) -> dict[str, Any]:
    return dict(json.loads(oe(lab, "status --json", source).check().stdout))


def daemon_log(lab: Lab) -> str:
    p = lab.run_dir / "logs" / "oe-routerd.log"
    return p.read_text(errors="replace") if p.exists() else ""


def stop_daemon(lab: Lab) -> None:
    """SIGTERM oe-routerd (it removes its SAs and policies), dnsmasq back to the resolver."""
    lab.router(
        "pid=$(cat /run/oe-routerd.pid) && kill -TERM $pid; for i in $(seq 50); do "
        "kill -0 $pid 2>/dev/null || break; sleep 0.1; done; rm -f /run/oe-routerd.pid"
    )
    _dnsmasq(lab, lab.plan.resolver, 150)
    lab.router("ip xfrm state flush; ip xfrm policy flush")


TWIN_CONN = "clear-or-private-6"

# Run in the host's netns with LAB_STATE set, like labkit's set-group.sh: stop pluto, write
# ipsec.conf (the IPv4 conn only, or with the IPv6 twin), start pluto and wait for its groups.
_TWIN_SWITCH = """set -eu
. /lab/bundle/lib/common.sh
LAB_HOST={netns}
STATE="$LAB_STATE/{netns}"
export STATE LAB_HOST
lab_pluto_stop
[ -f "$STATE/ipsec.conf.v4" ] || cp "$STATE/ipsec.conf" "$STATE/ipsec.conf.v4"
if [ "$1" = on ]; then
    cat "$STATE/ipsec.conf.v4" /lab/{netns}-v6.conf >"$STATE/ipsec.conf"
    echo '::/0' >"$STATE/ipsec.d/policies/{conn}"
    lab_pluto clear-or-private {conn}
else
    cp "$STATE/ipsec.conf.v4" "$STATE/ipsec.conf"
    rm -f "$STATE/ipsec.d/policies/{conn}"
    lab_pluto clear-or-private
fi
"""


def libreswan_ipv6_twin(
    lab: Lab, netns: str, address: str, on: bool, address_pool: str | None = None
) -> None:
    """Restart ``netns``'s pluto with (``on``) or without the IPv6 twin of its clear-or-private
    conn: left=``address``, policy ::/0, optionally an IPv6 address pool (CAT)."""
    if on:
        text = peers.render_libreswan_conf(
            address, {"clear-or-private": ["::/0"]}, address_pool=address_pool
        )
        body = text.split("\n\n", 2)[-1].strip()  # the conn, without the config setup
        if not body.startswith("conn clear-or-private\n"):
            raise LabError(f"labkit rendered an unexpected conn for {netns}:\n{body}")
        conn = body.replace("conn clear-or-private\n", f"conn {TWIN_CONN}\n", 1) + "\n"
        (lab.run_dir / f"{netns}-v6.conf").write_text(conn)
        script = _TWIN_SWITCH.format(netns=netns, conn=TWIN_CONN)
        (lab.run_dir / f"{netns}-v6.sh").write_text(script)
    lab.world(
        f"LAB_STATE={LAB_STATE} ip netns exec {netns} sh /lab/{netns}-v6.sh "
        f"{'on' if on else 'off'}",
        timeout=90,
    ).check()


def libreswan_set_group(lab: Lab, netns: str, variant: str) -> None:
    """labkit's set-group.sh: restart ``netns``'s pluto with one OE group (or "matrix")."""
    lab.world(
        f"LAB_STATE={LAB_STATE} ip netns exec {netns} "
        f"sh /lab/bundle/hosts/{netns}/set-group.sh {variant}",
        timeout=90,
    ).check()
