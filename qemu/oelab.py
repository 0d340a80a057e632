"""Turning the product on in a booted lab: oe-routerd on the router (its DNS front captures
dnsmasq's forwards while it runs), the router's identity installed from the world bundle
(never baked into the image).

Used by demo.py and the tests in tests/qemu; each step fails with one message naming what is
missing. ``source`` runs the daemon from a copy of src/ on the 9p share instead of the image's
installed package (for quick development loops only; the tests use the image).

``start_daemon`` takes configuration overrides (``options``: "section.option" -> a value, or
a list of values for a UCI list; ``extra_config``: sections appended, e.g. policies) and extra
environment for the daemon (``env``, e.g. OE_ROUTER_FAULT); without them it starts the
shipped configuration as before.

``libreswan_ipv6_twin`` gives a libreswan host an IPv6 twin of its IPv4 OE conn for a
test's duration (libreswan OE conns have one address family; the shipped lab has IPv4 ones).

Offload helpers: ``offload_report`` (`oe offload [bench] --json`), ``offload_rows`` (its
engine table as figures), the virtio-crypto device and its interrupt count, and
``act_and_watch`` (do something in the router, time the daemon's reaction from its log).
The policy matrix (``matrix_*``, ``MATRIX_EXPECTED``): libreswan's expected outcome per cell,
one traffic window for many cells, and the verdict per cell, shared by the matrix modules.
``silent_host``: a world host that drops IKE without a word for a block's duration.
``first_flow``: the LAN client's TCP flow to a keyed host on its cable and the WAN's, and
how it differs from "its one SYN left the router as ESP, nothing in the clear".
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lab import LAB_DNSMASQ, LAB_STATE, ROUTER_LAN_DEV, Capture, Lab, LabError
from labkit import peers, world
from oe_router.config import uci

DNS_FRONT = "127.0.0.1#5335"  # the DNS front's default listen address in files/etc/config/oe
#: the daemon's nftables table that redirects the router's own DNS to the front (capture.py)
CAPTURE_TABLE = "oe_dns"
REPO = Path(__file__).resolve().parents[1]
LOG = "/lab/logs/oe-routerd.log"
T = TypeVar("T")


@contextlib.contextmanager
def silent_host(lab: Lab, netns: str) -> Iterator[None]:
    """The world host ``netns`` drops IKE (UDP 500/4500) without a word while the block
    runs, as most of the Internet does: no answer, no ICMP."""
    lab.host(
        netns,
        "nft add table inet oe_silent && nft add chain inet oe_silent in "
        "'{ type filter hook input priority 0; }' && "
        "nft add rule inet oe_silent in udp dport '{ 500, 4500 }' drop",
    ).check()
    try:
        yield
    finally:
        lab.host(netns, "nft delete table inet oe_silent")


def restart_dnsmasq(
    lab: Lab, servers: Sequence[str] = (), cache: int = 150, extra: str = ""
) -> None:
    """The session lab's dnsmasq again, with ``servers`` as its upstreams (default: the lab
    resolver), ``cache`` entries and ``extra`` switches, as the lab's set-up starts it."""
    switches = " ".join(f"--server={s}" for s in (servers or (lab.plan.resolver,)))
    switches += f" {extra}" if extra else ""
    lab.router(
        "kill $(cat /run/dnsmasq.pid) 2>/dev/null; sleep 0.3; "
        f"dnsmasq --conf-file=/dev/null --interface={ROUTER_LAN_DEV} --bind-dynamic --no-resolv "
        f"{switches} --proxy-dnssec --cache-size={cache} {LAB_DNSMASQ}"
    ).check()


#: The shipped config's commented fixed trust anchor, switched on: the lab's root is not
#: IANA's, so the router validates from the lab root's DS (start_daemon puts it there)
#: instead of the managed IANA anchors of the default.
_LAB_ANCHOR = ("#option trust_anchor '/etc/oe/root.key'", "option trust_anchor '/etc/oe/root.key'")


def router_config(local_id: str = "%null") -> str:
    """The shipped /etc/config/oe with the router's IKE identity and the lab's anchor set."""
    text = (REPO / "files" / "etc" / "config" / "oe").read_text()
    if _LAB_ANCHOR[0] not in text:
        raise LabError(f"files/etc/config/oe has no {_LAB_ANCHOR[0]!r} line to switch on")
    text = text.replace(*_LAB_ANCHOR)
    return text.replace("option local_id '%null'", f"option local_id '{local_id}'")


Options = Mapping[str, str | Sequence[str]]


def configure(text: str, options: Options | None = None, extra_config: str = "") -> str:
    """``text`` (UCI) with ``options`` set and ``extra_config`` appended.

    ``options`` maps "section.option" (a named section: global, dns, ike, identity) to a
    value (``option``) or a list of values (``list``, replacing the section's own). The
    result is written by the project's UCI writer, so comments do not survive; without
    options the text is returned as it was.
    """
    if options:
        pkg = uci.parse(text, "oelab")
        sections = {sec.name: sec for sec in pkg.sections if sec.name}
        for key, value in options.items():
            name, _, opt = key.partition(".")
            sec = sections.get(name)
            if sec is None or not opt:
                raise LabError(f"oelab option {key!r}: no section {name!r} in the config")
            sec.set_option(opt, "")  # drop the option or list as the file had it
            if isinstance(value, str):
                sec.set_option(opt, value)
            else:
                for item in value:
                    sec.add_list(opt, item)
        text = uci.dumps(pkg)
    return text + extra_config


def start_daemon(
    lab: Lab,
    *,
    local_id: str = "%null",
    source: bool = False,
    timeout: float = 30,
    options: Options | None = None,
    extra_config: str = "",
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Install trust anchor and identity, start oe-routerd, wait for its DNS front and capture.

    ``options`` and ``extra_config`` change the configuration (see ``configure``); ``env``
    is added to the daemon's environment. Returns the first `oe status --json` document;
    raises LabError naming what failed.
    """
    info = lab.world_info.get("router", {})
    ta, key = info.get("trust_anchor_ds"), info.get("identity_key")
    if not ta or not key:
        raise LabError("the world bundle names no router trust anchor / identity key")
    (lab.run_dir / "oe.conf").write_text(configure(router_config(local_id), options, extra_config))
    prefix = ""
    if source:
        shutil.copytree(REPO / "src", lab.run_dir / "src", dirs_exist_ok=True)
        prefix = "PYTHONPATH=/lab/src "
    daemon_env = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    lab.router(
        "mkdir -p /etc/oe /var/run/oe; "  # resolv.conf.auto is netifd's (the WAN's dns)
        f"cp /lab/bundle/{ta} /etc/oe/root.key; "
        f"install -m 600 /lab/bundle/{key} /etc/oe/private.pem; "
        "cp /lab/oe.conf /etc/config/oe"
    ).check()
    if prefix or daemon_env:
        # a development copy of src/ or a fault injected through the environment: started
        # by hand, as procd's instance takes neither
        lab.router(
            f"{prefix}{daemon_env}nohup oe-routerd --config /etc/config/oe >>{LOG} 2>&1 "
            "</dev/null & echo $! > /run/oe-routerd.pid"
        ).check()
    else:
        # the package's init script under procd; its output reaches LOG through logd
        # (router_setup_script's logread follower)
        lab.router(
            "/etc/init.d/oe start && for i in $(seq 100); do "
            "pid=$(pgrep -x oe-routerd) && break; sleep 0.1; done; "
            '[ -n "$pid" ] && echo $pid > /run/oe-routerd.pid'
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
    # dnsmasq keeps the lab resolver as its upstream: the daemon's capture (table inet oe_dns)
    # redirects its forwards to the front while the front runs
    if (options or {}).get("dns.mode", "dnsmasq") == "dnsmasq":
        while lab.router(f"nft list table inet {CAPTURE_TABLE} >/dev/null").rc != 0:
            if time.monotonic() > deadline:
                capture = status.get("dns", {}).get("capture")
                raise LabError(f"oe-routerd's DNS capture is not on (oe status: {capture})")
            time.sleep(0.3)
    # No cache while the daemon runs: a cached answer never reaches the front, and the tests
    # rely on every query for a keyed name getting its tunnel (and its hold) before the answer
    restart_dnsmasq(lab, cache=0)
    return status


@dataclass(frozen=True)
class LanAnswer:
    """One DNS answer the LAN client got from the router (``lan_query``)."""

    status: str  #: NOERROR, SERVFAIL, NXDOMAIN, ... or "no answer"
    addresses: list[str]
    ms: int  #: dig's query time (-1 without an answer)
    out: str


def lan_query(lab: Lab, name: str, rdtype: str = "A") -> LanAnswer:
    """``name`` asked by the LAN client at the router's LAN address (its dnsmasq), one try
    with a 2 s timeout: an answer here is one the client got without retrying."""
    res = lab.client(f"dig @{lab.plan.router_lan4} +tries=1 +time=2 {name} {rdtype}", timeout=30)
    status = re.search(r"status: (\w+)", res.stdout)
    took = re.search(r"Query time: (\d+) msec", res.stdout)
    answer = res.stdout.split(";; ANSWER SECTION:", 1)[1] if "ANSWER SECTION" in res.stdout else ""
    return LanAnswer(
        status.group(1) if status else "no answer",
        re.findall(rf"\sIN\s+{rdtype}\s+(\S+)", answer),
        int(took.group(1)) if took else -1,
        res.stdout + res.stderr,
    )


def oe(lab: Lab, args: str, source: bool = False, timeout: float = 60) -> Any:
    prefix = "PYTHONPATH=/lab/src " if source else ""
    return lab.router(f"{prefix}oe {args}", timeout=timeout)


def status(lab: Lab, source: bool = False) -> dict[str, Any]:
    return dict(json.loads(oe(lab, "status --json", source).check().stdout))


def daemon_log(lab: Lab) -> str:
    p = lab.run_dir / "logs" / "oe-routerd.log"
    return p.read_text(errors="replace") if p.exists() else ""


def stop_daemon(lab: Lab) -> None:
    """SIGTERM oe-routerd (it removes its SAs and policies and its DNS capture), dnsmasq's
    cache back,
    and what the daemon keeps on purpose after a stop (the "private" drops: XFRM policies,
    or the userspace datapath's nftables projection, and the LAN's SNAT they rely on)
    removed, so the next test starts clean."""
    lab.router(
        "/etc/init.d/oe stop 2>/dev/null; "
        "pid=$(cat /run/oe-routerd.pid) && kill -TERM $pid; for i in $(seq 50); do "
        "kill -0 $pid 2>/dev/null || break; sleep 0.1; done; rm -f /run/oe-routerd.pid"
    )
    restart_dnsmasq(lab)
    lab.router(
        "ip xfrm state flush; ip xfrm policy flush; "
        "for t in oe_spd oe_router oe_cat oe_hold; do "
        "nft delete table inet $t 2>/dev/null; done; true"
    )


def reload_daemon(
    lab: Lab,
    *,
    local_id: str = "%null",
    options: Options | None = None,
    extra_config: str = "",
    source: bool = False,
) -> None:
    """Write a new /etc/config/oe (as start_daemon builds it) and `oe reload` it."""
    (lab.run_dir / "oe.conf").write_text(configure(router_config(local_id), options, extra_config))
    lab.router("cp /lab/oe.conf /etc/config/oe").check()
    res = oe(lab, "reload", source)
    if not res.ok:
        raise LabError(f"oe reload refused the configuration: {res.stdout}{res.stderr}")


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


# ------------------------------------------------------------------------------ offload


def offload_report(lab: Lab, source: bool = False, bench: bool = False) -> dict[str, Any]:
    """`oe offload --json` (``bench``: `oe offload bench --json`, measured again first)."""
    res = oe(lab, "offload bench --json" if bench else "offload --json", source, timeout=400)
    return dict(json.loads(res.check().stdout))


def offload_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The engine table of an `oe offload --json` document as flat rows (figures): engine,
    hw, driver, transform, KAT, Mbit/s per measured size, in use for."""
    return [
        {
            "engine": e["name"],
            "hw": e["hardware"],
            "driver": t["driver"],
            "transform": t["transform"],
            "kat": t["kat"],
            **{f"mbit_s@{r['size']}": r["mbit_s"] for r in t["rates"]},
            "in_use_for": t["in_use_for"],
        }
        for e in doc["engines"]
        for t in e["transforms"]
        if t["kat"] != "unsupported"
    ]


Packets = list[tuple[float, str]]  # (epoch seconds, tcpdump line), as Capture.packets


@dataclass
class FirstFlow:
    """The LAN client's TCP flow to a keyed host, as the two cables saw it."""

    syns: Packets  # the client's SYNs to the host, on its own cable
    clear: Packets  # TCP with the host on the WAN
    esp_out: Packets
    esp_in: Packets

    def problems(self) -> list[str]:
        """How the flow differs from "its one SYN left the router as ESP, nothing in the
        clear": a retransmitted (lost) SYN, cleartext TCP, fewer than 4 ESP packets a way,
        a first ESP packet that is not the SA's first (seq 1)."""
        out = []
        if len(self.syns) != 1:
            out.append("SYN retransmitted (first SYN lost):\n" + _lines(self.syns))
        if self.clear:
            out.append("cleartext TCP on the WAN:\n" + _lines(self.clear))
        if len(self.esp_out) < 4 or len(self.esp_in) < 4:
            out.append(f"ESP out/in {len(self.esp_out)}/{len(self.esp_in)}, not >= 4 each")
        elif "seq=0x1)" not in self.esp_out[0][1]:
            out.append(f"first ESP packet is not seq 1: {self.esp_out[0][1]}")
        return out


def _lines(packets: Packets) -> str:
    return "\n".join(line for _, line in packets)


def first_flow(lab: Lab, lan: Capture, wan: Capture, peer: str, wan4: str) -> FirstFlow:
    """The client's TCP flow to ``peer`` from ``lan`` (the client's cable) and ``wan``
    (the router's WAN cable, where the router is ``wan4``)."""
    return FirstFlow(
        syns=lan.packets(f"src {lab.plan.client4} and dst {peer} and tcp[tcpflags] == tcp-syn"),
        clear=wan.packets(f"host {peer} and tcp"),
        esp_out=wan.packets(f"esp and src {wan4} and dst {peer}"),
        esp_in=wan.packets(f"esp and src {peer} and dst {wan4}"),
    )


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, pause: float = 0.5) -> T:
    """``probe()`` until it returns something other than None or False; LabError after
    ``timeout`` seconds naming ``what`` (and the last thing the probe returned)."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not within {timeout:.0f} s")
        time.sleep(pause)


def virtio_crypto_device(lab: Lab) -> tuple[str, str]:
    """(virtio device name, PCI address) of the router's virtio-crypto device, found by the
    driver that holds it (virtio_crypto); LabError when no device is bound to it."""
    res = lab.router(
        "d=$(readlink -f /sys/bus/virtio/drivers/virtio_crypto/virtio* | head -n1); "
        '[ -n "$d" ] && basename "$d" && basename "$(dirname "$d")"'
    )
    if res.rc != 0 or len(res.stdout.split()) != 2:
        raise LabError("no device is bound to the router's virtio_crypto driver")
    name, pci = res.stdout.split()
    return name, pci


def virtio_crypto_interrupts(lab: Lab, name: str) -> int:
    """Interrupts the virtio-crypto device ``name`` raised so far (all its vectors): each
    completed request raises one (or one per burst), so a delta shows the device worked."""
    text = lab.router("cat /proc/interrupts").check().stdout
    total = 0
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[-1].startswith(f"{name}-") and parts[0].endswith(":"):
            total += sum(int(p) for p in parts[1:] if p.isdigit())
    return total


# Runs in the router: do ACTION (a shell command), then follow the daemon's log and note
# when each pattern first shows, in seconds after the action started (an upper bound on the
# reaction: starting a shell alone takes a good part of a second under TCG); stops when all
# have shown or after LIMIT seconds. One JSON line out.
_ACT_AND_WATCH = r"""
import json, subprocess, sys, time
log, limit, action = sys.argv[1], float(sys.argv[2]), sys.argv[3]
patterns = dict(zip(sys.argv[4::2], sys.argv[5::2]))
f = open(log, errors="replace")
f.seek(0, 2)
t_start = time.time()
done = subprocess.run(action, shell=True, capture_output=True, text=True)
t0 = time.time()
seen, buf = {}, ""
while time.time() - t0 < limit and len(seen) < len(patterns):
    chunk = f.read()
    if not chunk:
        time.sleep(0.02)
        continue
    buf += chunk
    *lines, buf = buf.split("\n")
    now = round(time.time() - t_start, 3)
    for line in lines:
        for key, pat in patterns.items():
            if key not in seen and pat in line:
                seen[key] = [now, line[:300]]
print(json.dumps({"action_rc": done.returncode, "action_err": done.stderr[-300:],
                  "action_s": round(t0 - t_start, 3), "at": t0, "seen": seen}))
"""


def act_and_watch(
    lab: Lab, action: str, patterns: Mapping[str, str], limit: float
) -> dict[str, Any]:
    """Run ``action`` in the router and time the daemon's reaction from its log: for each
    ``patterns`` key, [seconds since the action started, the log line] of the first line
    holding its text (keys not seen within ``limit`` seconds after it returned are missing).
    Also ``action_s`` (how long the action took), ``action_rc`` and ``at`` (the router's
    clock when it returned)."""
    (lab.run_dir / "act_and_watch.py").write_text(_ACT_AND_WATCH)
    args = " ".join(shlex.quote(a) for kv in patterns.items() for a in kv)
    res = lab.router(
        f"python3 /lab/act_and_watch.py {LOG} {limit} {shlex.quote(action)} {args}",
        timeout=limit + 60,
    ).check()
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------ policy matrix
# The 25-cell OE policy matrix against labkit's matrix peer "ls-m" (one address per cell,
# labkit.world.matrix_address): our group for the peer x libreswan's group for the router.
# Shared by the matrix modules; tests/qemu/test_oe_matrix.py documents the expectations.

MATRIX_GROUPS = peers.OE_GROUPS
MATRIX_PORT = 8080

# (ours, libreswan's): (gets through, wire, why). wire, on the router's WAN cable:
#   esp        ESP both ways, not one cleartext packet of the flow either way
#   esp-late   the peer initiated: our first requests leave in the clear, then ESP both ways;
#              the peer never replies in the clear
#   clear      cleartext both ways, no ESP
#   clear-out  our cleartext requests leave, nothing comes back (the peer drops), no ESP
#   none       nothing of the flow on the WAN (IKE may be tried), no ESP
MATRIX_EXPECTED: dict[tuple[str, str], tuple[bool, str, str]] = {
    ("private-or-clear", "private-or-clear"): (True, "esp", "we trap and initiate, it answers"),
    ("private-or-clear", "clear-or-private"): (True, "esp", "we initiate, it answers only"),
    ("private-or-clear", "private"): (True, "esp", "we initiate, it answers (private too)"),
    ("private-or-clear", "clear"): (True, "clear", "it refuses IKE: our pass failure shunt"),
    ("private-or-clear", "block"): (False, "clear-out", "IKE fails: we pass, it drops"),
    ("clear-or-private", "private-or-clear"): (
        True,
        "esp-late",
        "our request leaves clear; its reply traps, it initiates, we answer",
    ),
    ("clear-or-private", "clear-or-private"): (True, "clear", "nobody initiates"),
    ("clear-or-private", "private"): (True, "esp-late", "it initiates on its reply, we answer"),
    ("clear-or-private", "clear"): (True, "clear", "nobody initiates"),
    ("clear-or-private", "block"): (False, "clear-out", "we send clear, it drops"),
    ("private", "private-or-clear"): (True, "esp", "we initiate, it answers"),
    ("private", "clear-or-private"): (True, "esp", "we initiate, it answers"),
    ("private", "private"): (True, "esp", "we initiate, it answers"),
    ("private", "clear"): (False, "none", "it refuses IKE: our drop failure shunt"),
    ("private", "block"): (False, "none", "IKE fails: our drop failure shunt"),
    ("clear", "private-or-clear"): (
        True,
        "clear",
        "its reply traps, we refuse IKE, its pass failure shunt",
    ),
    ("clear", "clear-or-private"): (True, "clear", "nobody initiates"),
    ("clear", "private"): (False, "clear-out", "we refuse its IKE: its drop failure shunt"),
    ("clear", "clear"): (True, "clear", "plain IP both sides"),
    ("clear", "block"): (False, "clear-out", "we send clear, it drops"),
    ("block", "private-or-clear"): (False, "none", "we drop before anything leaves"),
    ("block", "clear-or-private"): (False, "none", "we drop"),
    ("block", "private"): (False, "none", "we drop"),
    ("block", "clear"): (False, "none", "we drop"),
    ("block", "block"): (False, "none", "both drop"),
}


def matrix_address(ours: str, theirs: str) -> str:
    return str(world.matrix_address(ours, theirs))


def matrix_policies(ours: Sequence[str]) -> str:
    """Config sections putting each cell of the rows ``ours`` into our group for it."""
    text = ""
    for group in ours:
        text += f"\nconfig policy\n\toption group '{group}'\n"
        text += "".join(f"\tlist dest '{matrix_address(group, t)}/32'\n" for t in MATRIX_GROUPS)
    return text


@dataclass
class MatrixCell:
    """What one cell's flow did: the client's view and the WAN cable's packet counts."""

    ping_replies: int
    last_replies: int  # replies among the last 5 pings: the steady state
    http: str
    esp_out: int = 0
    esp_in: int = 0
    clear_out: int = 0
    clear_in: int = 0
    ike: int = 0


_MX_LINE = re.compile(
    r"IP (\d+\.\d+\.\d+\.\d+)(?:\.(\d+))? > (\d+\.\d+\.\d+\.\d+)(?:\.(\d+))?: (.*)"
)


def matrix_traffic(
    lab: Lab, cells: Sequence[tuple[str, str]], pings: int = 30, label: str = "matrix"
) -> dict[tuple[str, str], MatrixCell]:
    """Every cell's traffic at once from the LAN client (`ping -i 0.5 -c pings` and an HTTP
    fetch to port 8080, `curl -m 30`), counted per cell on the router's WAN cable."""
    wan4 = lab.plan.router_wan4
    by_addr = {matrix_address(o, t): (o, t) for o, t in cells}
    addrs = list(by_addr)
    jobs = " ".join(
        f"( ping -n -i 0.5 -c {pings} -W 1 {a} > /tmp/mx/{a}.ping 2>&1 ) & "
        f"( curl -s -o /dev/null -m 30 -w '%{{http_code}}' http://{a}:{MATRIX_PORT}/ "
        f"> /tmp/mx/{a}.http 2>&1 ) & "
        for a in addrs
    )
    script = (
        f"rm -rf /tmp/mx; mkdir -p /tmp/mx; {jobs} wait; "
        f'for a in {" ".join(addrs)}; do echo "== $a"; cat /tmp/mx/$a.ping; '
        'echo "http=$(cat /tmp/mx/$a.http)"; done'
    )
    with lab.capture_wan(bpf=f"host {wan4} and net 203.0.113.96/27", label=label) as cap:
        out = lab.client(script, timeout=120).check().stdout
    seen: dict[str, MatrixCell] = {}
    for block in out.split("== ")[1:]:
        addr, _, body = block.partition("\n")
        seqs = [int(s) for s in re.findall(r"bytes from .*icmp_seq=(\d+)", body)]
        http = re.search(r"http=(\S*)", body)
        seen[addr.strip()] = MatrixCell(
            ping_replies=len(seqs),
            last_replies=len([s for s in seqs if s > pings - 5]),
            http=http.group(1) if http else "",
        )
    for line in cap.text().splitlines():
        m = _MX_LINE.search(line)
        if m is None:
            continue
        src, sport, dst, dport, rest = m.groups()
        out_bound = src == wan4
        cell = seen.get(dst if out_bound else src)
        if cell is None:
            continue
        ports = {sport, dport}
        if rest.startswith("ESP") or "UDP-encap: ESP" in rest:
            if out_bound:
                cell.esp_out += 1
            else:
                cell.esp_in += 1
        elif ports & {"500", "4500"}:
            cell.ike += 1
        elif rest.startswith("ICMP echo") or str(MATRIX_PORT) in ports:
            if out_bound:
                cell.clear_out += 1
            else:
                cell.clear_in += 1
    return {by_addr[a]: c for a, c in seen.items()}


def matrix_problems(ours: str, theirs: str, c: MatrixCell) -> list[str]:
    """How the cell's flow differs from MATRIX_EXPECTED (empty: as libreswan's tests say)."""
    passes, wire, why = MATRIX_EXPECTED[(ours, theirs)]
    out: list[str] = []
    if passes:
        if c.last_replies < 4:
            out.append("ping did not get through in the end")
        if c.http != "200":
            out.append("HTTP did not get through")
    else:
        if c.ping_replies:
            out.append("ping got through")
        if c.http == "200":
            out.append("HTTP got through")
    esp_both = c.esp_out > 0 and c.esp_in > 0
    no_esp = c.esp_out == 0 and c.esp_in == 0
    if wire == "esp":
        if not esp_both:
            out.append("no ESP both ways")
        if c.clear_out or c.clear_in:
            out.append("cleartext on the WAN")
    elif wire == "esp-late":
        if not esp_both:
            out.append("no ESP both ways")
        if c.clear_in:
            out.append("the peer replied in the clear")
    elif wire == "clear":
        if not no_esp:
            out.append("ESP on the WAN")
        if not (c.clear_out and c.clear_in):
            out.append("no cleartext both ways")
    elif wire == "clear-out":
        if not no_esp:
            out.append("ESP on the WAN")
        if not c.clear_out or c.clear_in:
            out.append("not our cleartext alone (requests out, nothing back)")
    else:
        if not no_esp:
            out.append("ESP on the WAN")
        if c.clear_out or c.clear_in:
            out.append("cleartext on the WAN")
    return [f"{p} (expected {wire}: {why})" for p in out]


#: IKEv2 implementations in the world VM: the peer host -> its name and how to ask its version
PEER_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "libreswan": ("libreswan (pluto)", "dpkg-query -W -f '${Version}' libreswan"),
    "strongswan": (
        "strongSwan (charon)",
        "chroot /opt/swroot dpkg-query -W -f '${Version}' strongswan-charon",
    ),
    "openiked": ("OpenIKED (iked)", "dpkg-query -W -f '${Version}' openiked"),
}


class Interop:
    """The IKEv2 pairs this run established with other implementations (issue 15's table):
    per pair, who initiated, the IKE and ESP transforms and the authentication each side
    used, as our `oe status` reported them for an SA the test proved with traffic.
    Written as JSON to ``path`` and, as a Markdown table, next to it (``.md``)."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.lab = lab
        self.path = path
        self.rows: list[dict[str, str]] = []

    def record(self, test: str, peer: str, host: str, row: Mapping[str, Any]) -> None:
        """``row``: our `oe status` tunnel row of the IKE SA with ``host`` (a ``peer`` of
        PEER_IMPLEMENTATIONS), established and carrying a Child SA."""
        if peer not in PEER_IMPLEMENTATIONS:
            raise LabError(f"unknown IKEv2 implementation {peer!r}")
        child = row["children"][0]
        self.rows.append(
            {
                "peer": peer,
                "host": host,
                "initiator": "router" if row["role"] == "initiator" else peer,
                "ike": row["transform"],
                "esp": child["transform"],
                "router_auth": row["local_auth"],
                "peer_auth": row["remote_auth"],
                "router_id": row["local_id"],
                "peer_id": row["remote_id"],
                "test": test,
            }
        )

    def write(self) -> None:
        """The JSON document and the table, each peer named with its package version."""
        if not self.rows:
            return
        versions: dict[str, str] = {}
        for peer, (name, cmd) in PEER_IMPLEMENTATIONS.items():
            res = self.lab.world(cmd)
            versions[peer] = f"{name} {res.stdout.strip()}" if res.ok else name
        self.path.parent.mkdir(exist_ok=True)
        doc = {"peers": versions, "pairs": self.rows}
        self.path.write_text(json.dumps(doc, indent=2) + "\n")
        head = "| peer | initiator | IKE SA | Child SA | router auth | peer auth | test |"
        lines = [head, "|" + "---|" * 7]
        for r in self.rows:
            who = "router" if r["initiator"] == "router" else "peer"
            lines.append(
                f"| {versions[r['peer']]} ({r['host']}) | {who} | {r['ike']} | {r['esp']} "
                f"| {r['router_auth']} | {r['peer_auth']} | {r['test'].split('/')[-1]} |"
            )
        self.path.with_suffix(".md").write_text("\n".join(lines) + "\n")
