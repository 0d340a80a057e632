"""oe-routerd under OpenWrt's own runtime in the router image: procd, uci, logd, ubus, rpcd.

Why: on a router the package is driven by procd (respawn, reload on a config change),
read through logread, and reached by LuCI over ubus and rpcd's ACL. These tests run that
real userland (built from source, procd as PID 1) against the installed package, where
tests/unit once had recording stand-ins of rc.common and procd.sh: what procd holds
(`ubus call service list`), what the daemon answers (`oe status`, `ubus call oe ...`), what
logd kept (`logread`), and what rpcd grants (`ubus call session access`).

One daemon for the module (started by /etc/init.d/oe under procd, oelab.start_daemon);
the tests that replace it (kill -9, enabled off/on) come last and leave a running daemon
behind, whose pid they write to /run/oe-routerd.pid for oelab.stop_daemon.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-openwrt-runtime.json"
INITSCRIPT = "/etc/init.d/oe"
COMMAND = ["/usr/bin/oe-routerd", "--config", "/etc/config/oe", "--syslog"]
KEYED = "oe-null"  # null.example.test: IPSECKEY with NULL auth, libreswan answers
NO_IKE = "plain"  # answers IKE with ICMP port unreachable: a pass shunt at once
READS = ["status", "tunnels", "shunts", "offload", "devices", "explain"]
#: logread's ctime() in front of each line: "Sun Dec  6 09:34:04 2026 "
CTIME = re.compile(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} ")
WRITES = ["flush", "reload", "up", "down"]


# ------------------------------------------------------------------------------ helpers


def ubus(lab: Lab, obj: str, method: str, args: dict[str, Any] | None = None) -> Any:
    """`ubus call obj method [args]` on the router: its JSON reply (LabError if it failed)."""
    arg = f" {shlex.quote(json.dumps(args))}" if args is not None else ""
    out = lab.router(f"ubus call {obj} {method}{arg}").check().stdout
    return json.loads(out) if out.strip() else {}


def service(lab: Lab) -> dict[str, Any]:
    """procd's view of the service oe (instances, and with verbose its triggers)."""
    doc = ubus(lab, "service", "list", {"name": "oe", "verbose": True})
    return dict(doc.get("oe", {}))


def running_pid(lab: Lab) -> int | None:
    """The pid procd runs the instance oe-routerd with, None when it runs none."""
    inst = service(lab).get("instances", {}).get("oe-routerd")
    if not inst or not inst.get("running"):
        return None
    return int(inst["pid"])


def answering_pid(lab: Lab) -> int | None:
    """daemon.pid of `oe status --json`, None while nothing answers."""
    res = lab.router("oe status --json", timeout=20)
    return int(json.loads(res.stdout)["daemon"]["pid"]) if res.ok else None


def logread(lab: Lab, pid: int) -> list[str]:
    """logd's lines of the daemon process ``pid`` (tagged oe-routerd[pid] through
    /dev/log), each without logread's ctime: ``daemon.info oe-routerd[pid]: dns: ...``."""
    text = lab.router("logread").check().stdout
    return [CTIME.sub("", ln) for ln in text.splitlines() if f"oe-routerd[{pid}]:" in ln]


def xfrm_keys(lab: Lab) -> set[str]:
    """The key bytes of every SA in the router's kernel (``ip xfrm state`` prints them in
    hex), for checking that none reaches the log."""
    out = lab.router("ip xfrm state").check().stdout
    return {k.lower() for k in re.findall(r"0x([0-9a-fA-F]{32,})", out)}


def uci_apply(lab: Lab, *changes: str) -> float:
    """`uci` each change ("set oe.x.y=v", "delete oe.x.y"), `uci commit oe`, `reload_config`,
    as LuCI's apply does; returns the router's clock when reload_config returned."""
    sets = " && ".join(f"uci {shlex.join(c.split(' ', 1))}" for c in changes)
    out = lab.router(f"{sets} && uci commit oe && reload_config && date +%s.%N").check().stdout
    return float(out.split()[-1])


def router_now(lab: Lab) -> float:
    return float(lab.router("date +%s.%N").check().stdout)


def wait_daemon_ready(lab: Lab, old_pid: int, what: str) -> int:
    """A new instance (pid != old_pid) under procd that answers `oe status` and whose DNS
    front listens; written to /run/oe-routerd.pid for oelab.stop_daemon. Returns its pid."""
    pid = oelab.wait_until(
        f"{what}: procd runs a new oe-routerd",
        lambda: (p := running_pid(lab)) is not None and p != old_pid and p,
        60,
    )
    oelab.wait_until(
        f"{what}: `oe status` answers from pid {pid}", lambda: answering_pid(lab) == pid, 60
    )
    oelab.wait_until(
        f"{what}: the DNS front listens again",
        lambda: lab.router("ss -lnu | grep -q '127.0.0.1:5335 '").ok,
        60,
    )
    lab.router(f"echo {pid} > /run/oe-routerd.pid").check()
    return pid


class Listener:
    """`ubus listen` for some events, in the background on the router; its lines read back."""

    PROBE = "oe-lab.probe"

    def __init__(self, lab: Lab, events: tuple[str, ...]) -> None:
        self.lab = lab
        self.out = "/tmp/oe-runtime-listen.out"
        names = " ".join((*events, self.PROBE))
        cmd = f"setsid ubus -t 300 listen {names} >{self.out} 2>&1 </dev/null & echo $!"
        self.pid = int(lab.router(cmd).check().stdout.strip())
        oelab.wait_until("`ubus listen` registered", self._probe, 15)

    def _probe(self) -> bool:
        """Registered once a probe event sent comes back (no fixed sleep)."""
        if self.events(self.PROBE):
            return True
        self.lab.router(f"ubus send {self.PROBE} '{{}}'").check()
        return False

    def events(self, name: str) -> list[dict[str, Any]]:
        text = self.lab.router(f"cat {self.out}").check().stdout
        found = []
        for line in text.splitlines():
            if line.startswith("{"):
                obj = json.loads(line)
                if name in obj:
                    found.append(obj[name])
        return found

    def close(self) -> None:
        self.lab.router(f"kill {self.pid} 2>/dev/null; rm -f {self.out}")


@contextlib.contextmanager
def listening(lab: Lab, *events: str) -> Iterator[Listener]:
    listener = Listener(lab, events)
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(scope="module")
def rt(lab: Lab) -> Iterator[Lab]:
    """oe-routerd started by /etc/init.d/oe under procd; reload_config's baseline taken
    (its first run only records the configs' checksums), stopped at the end."""
    oelab.start_daemon(lab)
    try:
        lab.router("reload_config").check()
        yield lab
    finally:
        oelab.stop_daemon(lab)


# ------------------------------------------------------------------------------ procd, logd


def test_procd_holds_the_service_the_init_script_describes(rt: Lab) -> None:
    """The instance (command, respawn), the reload trigger on package oe, a child of PID 1."""
    svc = service(rt)
    inst = svc["instances"]["oe-routerd"]
    assert inst["running"] and inst["command"] == COMMAND, inst
    assert inst["respawn"] == {"threshold": 3600, "timeout": 5, "retry": 5}, inst
    pid = int(inst["pid"])
    assert answering_pid(rt) == pid
    ppid = rt.router(f"awk '/^PPid:/{{print $2}}' /proc/{pid}/status").check().stdout.strip()
    assert ppid == "1" and rt.router("cat /proc/1/comm").stdout.strip() == "procd"
    # procd_add_reload_trigger oe, as procd.sh writes it: on config.change of package oe,
    # run the init script's reload
    on_change = [t[1] for t in svc["triggers"] if t[0] == "config.change"]
    assert ["if", ["eq", "package", "oe"], ["run_script", INITSCRIPT, "reload"]] in on_change, svc[
        "triggers"
    ]


def test_logread_shows_the_daemons_lines_tagged_with_its_pid(
    rt: Lab, figures: dict[str, Any]
) -> None:
    """The daemon (--syslog) logs through /dev/log: logd keeps each line at its priority,
    facility daemon, tagged oe-routerd[pid], the component after the tag."""
    pid = running_pid(rt)
    assert pid is not None
    lines = logread(rt, pid)
    figures["logread_start"] = lines[:12]
    text = "\n".join(lines)
    tag = f"oe-routerd[{pid}]: "
    version = oelab.status(rt)["daemon"]["version"]
    assert f"daemon.notice {tag}daemon: oe-routerd {version} running (pid {pid}," in text, text
    assert (
        f"daemon.info {tag}control: ubus: object oe registered on /var/run/ubus/ubus.sock" in text
    )
    assert f"daemon.info {tag}dns: DNS front listening on 127.0.0.1:5335" in text
    # procd's stderr capture files whatever it gets at daemon.err: nothing went that way
    assert not [ln for ln in lines if ln.startswith("daemon.err") or " info oe-routerd[" in ln]


# ------------------------------------------------------------------------------ ubus object


def test_ubus_lists_the_object_oe_with_its_policies(rt: Lab) -> None:
    listed = rt.router("ubus -v list oe").check().stdout.splitlines()
    assert re.fullmatch(r"'oe' @[0-9a-f]{8}", listed[0]), listed
    assert [line.strip() for line in listed[1:]] == [
        '"status":{}', '"tunnels":{}', '"shunts":{}', '"offload":{}', '"flush":{}',
        '"reload":{}', '"up":{"peer":"String","auth":"String","mode":"String",'
        '"peer_key":"String"}', '"down":{"peer":"String"}', '"devices":{"device":"String"}',
        '"explain":{"address":"String"}',
    ]  # fmt: skip


def test_a_tunnel_up_is_a_ubus_event_naming_the_peer(rt: Lab, figures: dict[str, Any]) -> None:
    """A LAN client's query for a keyed name: the tunnel comes up, `ubus listen` gets
    oe.tunnel.up for the peer, and `ubus call oe tunnels` has the IKE SA with that SPI."""
    peer = rt.plan.host(KEYED).ipv4
    name = rt.plan.host(KEYED).name
    with listening(rt, "oe.tunnel.up") as listen:
        res = rt.client(f"curl -s -m 20 -o /dev/null -w '%{{http_code}}' http://{name}/", 40)
        assert res.check().stdout == "200", res.stdout
        events = oelab.wait_until(
            f"oe.tunnel.up for {peer}",
            lambda: [e for e in listen.events("oe.tunnel.up") if e["peer"] == peer],
            20,
        )
    ev = events[0]
    figures["event_oe_tunnel_up"] = ev
    assert ev["local"] == rt.plan.router_wan4 and ev["mode"] in ("tunnel", "transport"), ev
    rows = [t for t in ubus(rt, "oe", "tunnels")["tunnels"] if t["peer"] == peer]
    spis = {c["spi_in"] for t in rows for c in t.get("children", ())}
    assert ev["spi_in"] in spis, (ev, rows)
    # one readable notice for the decision, without key bytes
    pid = running_pid(rt)
    assert pid is not None
    up = f"daemon.notice oe-routerd[{pid}]: oe: {name} ({peer}): protected, NULL auth, "
    lines = oelab.wait_until(
        "the decision line", lambda: [ln for ln in logread(rt, pid) if ln.startswith(up)], 20
    )
    figures["logread_tunnel_up"] = lines
    assert len(lines) == 1 and lines[0].endswith("(DNS)"), lines
    keys = xfrm_keys(rt)
    assert keys, "ip xfrm state shows no keys: nothing to look for"
    text = rt.router("logread").check().stdout.lower()
    assert not [k for k in keys if k in text or k[:16] in text]


#: Numbers of the status document that move between two reads of an idle daemon, and why:
#: clocks (the daemon's uptime; a tunnel's and a Child SA's age and time to its rekey; a
#: shunt's time to expiry) and counters that traffic and timers advance (the DNS front's,
#: IKE's and the datapath's counters, a tunnel's bytes and packets). Anything else that
#: differs between two reads is the daemon's state changing (an engine being measured):
#: the comparison is taken again.
MOVING = re.compile(
    r"daemon\.uptime_s"
    r"|tunnels\[\d+\]\.(established_s|rekey_in_s|(bytes|packets)_(in|out))"
    r"|tunnels\[\d+\]\.children\[\d+\]\.(established_s|rekey_in_s)"
    r"|shunts\[\d+\]\.expires_s"
    r"|daemon\.datapath_stats\..+|dns\..+|ike\..+"
)
#: In `oe offload --json`: the ESP self-test section's clock (seconds since it started).
OFFLOAD_MOVING = re.compile(r"kernel_selftest\.now_s")


class Unsettled(Exception):
    """The two CLI reads differ in more than MOVING: the daemon's state changed meanwhile."""


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def between(a: Any, via: Any, b: Any, path: str, moving: re.Pattern[str], moved: set[str]) -> None:
    """``via`` (ubus) read between ``a`` and ``b`` (the CLI) is their model: what a and b
    agree on it has too (floats to the 6 decimals ubus prints), and each number ``moving``
    names lies between its values in a and b. ``moved`` collects those (lists as [])."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise Unsettled(f"{path}: keys changed")
        assert isinstance(via, dict) and set(via) == set(a), f"{path}: {via!r:.200} vs {a!r:.200}"
        for k in a:
            between(a[k], via[k], b[k], f"{path}.{k}" if path else k, moving, moved)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            raise Unsettled(f"{path}: length changed")
        assert isinstance(via, list) and len(via) == len(a), f"{path}: {via!r:.200} vs {a!r:.200}"
        for i, (x, v, y) in enumerate(zip(a, via, b, strict=True)):
            between(x, v, y, f"{path}[{i}]", moving, moved)
    elif _num(a) and _num(b):
        assert _num(via), f"{path}: {via!r} is not a number ({a!r})"
        if abs(a - b) < 1e-6:
            assert abs(via - a) < 1e-6, f"{path}: ubus {via!r}, oe status {a!r}"
            return
        if not moving.fullmatch(path):
            raise Unsettled(f"{path}: {a} -> {b}")
        lo, hi = min(a, b), max(a, b)
        assert lo - 1e-6 <= via <= hi + 1e-6, f"{path}: ubus {via!r} not within {a!r}..{b!r}"
        moved.add(re.sub(r"\[\d+\]", "[]", path))
    else:
        if a != b:
            raise Unsettled(f"{path}: {a!r:.80} -> {b!r:.80}")
        assert via == a, f"{path}: ubus {via!r:.200}, oe status {a!r:.200}"


def same_model(rt: Lab, cli: str, method: str, moving: re.Pattern[str]) -> tuple[Any, set[str]]:
    """`oe CLI` (JSON), `ubus call oe METHOD`, `oe CLI` again, until the two CLI reads
    differ in ``moving`` numbers only; asserts the ubus reply is their model. Returns the
    ubus reply and the paths that moved."""
    deadline = time.monotonic() + 90
    while True:
        a = json.loads(rt.router(f"oe {cli}").check().stdout)
        via = ubus(rt, "oe", method)
        b = json.loads(rt.router(f"oe {cli}").check().stdout)
        moved: set[str] = set()
        try:
            between(a, via, b, "", moving, moved)
            return via, moved
        except Unsettled as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon's {method} kept changing: {exc}") from None
            time.sleep(1)


def test_ubus_status_is_the_model_of_oe_status_json(rt: Lab, figures: dict[str, Any]) -> None:
    """`ubus call oe status` == `oe status --json` but for clocks and counters (MOVING),
    which lie between two CLI reads taken around it; tunnels, shunts, offload are parts."""
    doc, moved = same_model(rt, "status --json", "status", MOVING)
    assert {"daemon", "tunnels", "shunts", "engines", "dns", "ike"} <= set(doc)
    assert doc["daemon"]["pid"] == running_pid(rt)
    assert "daemon.uptime_s" in moved  # a clock does move: the comparison is not vacuous
    figures["ubus_status_moved_between_two_cli_reads"] = sorted(moved)
    figures["ubus_call_oe_status"] = doc
    status = oelab.status(rt)
    tunnels, shunts = ubus(rt, "oe", "tunnels"), ubus(rt, "oe", "shunts")
    assert set(tunnels) == {"tunnels"} and set(shunts) == {"shunts"}
    assert [t["peer"] for t in tunnels["tunnels"]] == [t["peer"] for t in status["tunnels"]]
    assert [s["destination"] for s in shunts["shunts"]] == [
        s["destination"] for s in status["shunts"]
    ]
    offload, moved = same_model(rt, "offload --json", "offload", OFFLOAD_MOVING)
    assert offload["engines"] and "kernel_selftest.now_s" in moved, moved


def test_ubus_flush_removes_the_shunts_and_the_next_flow_negotiates(
    rt: Lab, figures: dict[str, Any]
) -> None:
    """A host without IKE gets a pass shunt (and the event oe.shunt); `ubus call oe flush`
    removes it: `oe status` shows none, and the next flow there tries IKE again."""
    plain = rt.plan.host(NO_IKE).ipv4
    curl = f"curl -4 -s -o /dev/null -m 15 -w '%{{http_code}}' http://{plain}/"
    with listening(rt, "oe.shunt") as listen:
        assert rt.client(curl, 40).check().stdout == "200"
        events = oelab.wait_until(
            f"oe.shunt for {plain}",
            lambda: [e for e in listen.events("oe.shunt") if e["destination"] == f"{plain}/32"],
            20,
        )
    assert events[0]["kind"] == "pass" and "ICMP unreachable" in events[0]["reason"], events
    pid = running_pid(rt)
    assert pid is not None
    clear = f"daemon.info oe-routerd[{pid}]: oe: {plain}: clear for "
    shunt_lines = [ln for ln in logread(rt, pid) if ln.startswith(clear)]
    figures["logread_pass_shunt"] = shunt_lines
    assert shunt_lines, logread(rt, pid)[-20:]
    shunts = ubus(rt, "oe", "shunts")["shunts"]
    assert f"{plain}/32" in [s["destination"] for s in shunts], shunts
    assert ubus(rt, "oe", "flush") == {"flushed": len(shunts)}
    assert oelab.status(rt)["shunts"] == [] and ubus(rt, "oe", "shunts") == {"shunts": []}
    ike = f"src {rt.plan.router_wan4} and dst {plain} and udp dst port 500"
    with rt.capture_wan(bpf=f"host {plain}", label="flushed-plain") as wan:
        assert rt.client(curl, 40).check().stdout == "200"
    assert wan.count(ike) >= 1, "no IKE_SA_INIT after the flush: the shunt still passed it"
    rt.router("oe flush").check()


# ------------------------------------------------------------------------------ uci, reload


def test_uci_change_and_reload_config_reload_the_running_daemon(
    rt: Lab, figures: dict[str, Any]
) -> None:
    """uci set + commit + reload_config: procd's config trigger runs the init script's
    reload, which SIGHUPs the daemon: the next config generation, same pid."""
    pid = running_pid(rt)
    before = oelab.status(rt)["daemon"]
    assert before["pid"] == pid
    gen = before["config_generation"]
    sighups = sum("SIGHUP: reloading /etc/config/oe" in ln for ln in logread(rt, pid))
    t0 = router_now(rt)
    done = uci_apply(rt, "set oe.global.log_level=debug")
    after = oelab.wait_until(
        f"config generation {gen + 1}",
        lambda: (d := oelab.status(rt)["daemon"])["config_generation"] > gen and d,
        30,
    )
    figures["reload_config_to_new_generation_s"] = round(router_now(rt) - t0, 2)
    figures["reload_config_took_s"] = round(done - t0, 2)
    assert after["config_generation"] == gen + 1 and after["pid"] == pid
    assert after["last_reload"]["accepted"] is True, after["last_reload"]
    assert after["last_reload"]["generation"] == gen + 1
    assert running_pid(rt) == pid
    lines = logread(rt, pid)
    figures["logread_reload"] = [ln for ln in lines if "SIGHUP" in ln or "reload" in ln][-4:]
    assert sum("SIGHUP: reloading /etc/config/oe" in ln for ln in lines) == sighups + 1, lines[-20:]
    assert any(f"reload accepted: config generation {gen + 1}" in ln for ln in lines), lines[-20:]
    assert rt.router("uci get oe.global.log_level").check().stdout.strip() == "debug"
    uci_apply(rt, "set oe.global.log_level=info")
    oelab.wait_until(
        f"config generation {gen + 2} (log_level back to info)",
        lambda: oelab.status(rt)["daemon"]["config_generation"] == gen + 2,
        30,
    )


def test_a_broken_value_is_refused_and_the_last_good_config_keeps_serving(
    rt: Lab, figures: dict[str, Any]
) -> None:
    """retransmit_tries 99 (1..20): the reload is refused naming the option, same pid and
    generation; the daemon goes on answering ubus and the DNS front, and a keyed name
    still gets its tunnel (ESP on the WAN). The good value back is accepted."""
    pid = running_pid(rt)
    before = oelab.status(rt)["daemon"]
    gen = before["config_generation"]
    last_at = (before["last_reload"] or {}).get("at_uptime_s", -1.0)
    uci_apply(rt, "set oe.ike.retransmit_tries=99")
    try:
        refused = oelab.wait_until(
            "the reload of retransmit_tries=99",
            lambda: (d := oelab.status(rt)["daemon"])
            and (d["last_reload"] or {}).get("at_uptime_s", -1.0) > last_at
            and d,
            30,
        )
        last = refused["last_reload"]
        figures["refused_last_reload"] = last
        assert last["accepted"] is False and last["generation"] == gen, last
        assert any("retransmit_tries" in p for p in last["problems"]), last
        assert refused["config_generation"] == gen and refused["pid"] == pid
        assert running_pid(rt) == pid
        refused_lines = [ln for ln in logread(rt, pid) if "reload refused" in ln]
        figures["logread_refused"] = refused_lines
        assert any("retransmit_tries" in ln for ln in refused_lines), refused_lines
        warn = f"daemon.warn oe-routerd[{pid}]: daemon: reload refused: "
        assert all(ln.startswith(warn) for ln in refused_lines), refused_lines
        assert ubus(rt, "oe", "status")["daemon"]["config_generation"] == gen
        peer, name = rt.plan.host(KEYED).ipv4, rt.plan.host(KEYED).name
        with rt.capture_wan(bpf=f"host {peer}", label="refused-reload") as wan:
            res = rt.client(f"curl -s -m 20 -o /dev/null -w '%{{http_code}}' http://{name}/", 40)
        assert res.check().stdout == "200"
        assert wan.count(f"esp and src {peer}") >= 1 and wan.count(f"esp and dst {peer}") >= 1
        assert wan.count("tcp port 80") == 0, wan.text("tcp port 80")
    finally:
        uci_apply(rt, "set oe.ike.retransmit_tries=3")
    good = oelab.wait_until(
        "the good value accepted again",
        lambda: (d := oelab.status(rt)["daemon"])["config_generation"] == gen + 1 and d,
        30,
    )
    assert good["last_reload"]["accepted"] is True and good["pid"] == pid


# ------------------------------------------------------------------------------ rpcd's ACL

#: SHA-512 crypt of "secret" (`openssl passwd -6 -salt oelabsalt secret`), as rpcd's
#: logins hold a password (rpcd's session.c hands it to crypt(3) and compares)
SECRET_HASH = (
    "$6$oelabsalt$"
    "ZTpZ57QVhASNG7WCdZJVRkoc02cEPzJqEKw4fxviRvnjSrTWByIAQe.O5vw9WjfoxU7gOf6k5APcNfHdfSQot1"
)


def test_rpcd_session_acl_grants_read_and_write_separately(rt: Lab) -> None:
    """Two logins in /etc/config/rpcd: one with the ACL group oe in its read list only,
    one in read and write. rpcd (which loaded /usr/share/rpcd/acl.d/oe.json at boot and
    reads the logins at every login) lets the first call the read methods only."""
    acl = json.loads(rt.router("cat /usr/share/rpcd/acl.d/oe.json").check().stdout)
    assert acl["oe"]["read"]["ubus"]["oe"] == READS
    assert acl["oe"]["write"]["ubus"]["oe"] == WRITES
    # the image has rpcd's /etc/config/rpcd (root's login, for LuCI): keep whatever is
    # there, and put it back after
    rt.router(
        "if [ -e /etc/config/rpcd ]; then cp -p /etc/config/rpcd /tmp/rpcd.orig; "
        "else touch /etc/config/rpcd; fi"
    ).check()
    sessions: list[str] = []
    try:
        for user, lists in (("oe-viewer", ("read",)), ("oe-admin", ("read", "write"))):
            adds = "".join(f" && uci add_list rpcd.@login[-1].{w}=oe" for w in lists)
            rt.router(
                f"uci add rpcd login >/dev/null && uci set rpcd.@login[-1].username={user} "
                f"&& uci set rpcd.@login[-1].password={shlex.quote(SECRET_HASH)}{adds} "
                "&& uci commit rpcd"
            ).check()
        wrong = rt.router('ubus call session login \'{"username": "oe-admin", "password": "x"}\'')
        assert wrong.rc == 250, wrong  # UBUS_STATUS_PERMISSION_DENIED: the hash is checked

        def login(user: str) -> str:
            sid = str(
                ubus(rt, "session", "login", {"username": user, "password": "secret"})[
                    "ubus_rpc_session"
                ]
            )
            sessions.append(sid)
            return sid

        def access(sid: str, function: str) -> bool:
            query = {"ubus_rpc_session": sid, "scope": "ubus", "object": "oe", "function": function}
            return bool(ubus(rt, "session", "access", query)["access"])

        viewer, admin = login("oe-viewer"), login("oe-admin")
        assert [access(viewer, f) for f in READS] == [True] * len(READS)
        assert [access(viewer, f) for f in WRITES] == [False] * 4
        assert [access(admin, f) for f in (*READS, *WRITES)] == [True] * (len(READS) + 4)
    finally:
        for sid in sessions:
            ubus(rt, "session", "destroy", {"ubus_rpc_session": sid})
        rt.router(
            "if [ -e /tmp/rpcd.orig ]; then mv /tmp/rpcd.orig /etc/config/rpcd; "
            "else rm -f /etc/config/rpcd; fi"
        ).check()
    assert "oe-viewer" not in rt.router("uci -q show rpcd").stdout


# ------------------------------------------------------------------------------ respawn


def test_kill_9_procd_respawns_the_daemon(rt: Lab, figures: dict[str, Any]) -> None:
    """kill -9: procd starts a new oe-routerd (after its respawn timeout, 5 s), which
    answers `oe status` and ubus and logs under its own pid."""
    old = running_pid(rt)
    assert old is not None
    rt.router(f"kill -9 {old}").check()
    t0 = time.monotonic()
    new = wait_daemon_ready(rt, old, "after kill -9")
    figures["kill_9_to_answering_s"] = round(time.monotonic() - t0, 1)
    assert rt.router(f"kill -0 {old} 2>/dev/null").rc != 0
    assert ubus(rt, "oe", "status")["daemon"]["pid"] == new
    assert any(f"running (pid {new}," in ln for ln in logread(rt, new))
    inst = service(rt)["instances"]["oe-routerd"]
    assert inst["running"] and inst["command"] == COMMAND


def test_enabled_off_in_uci_drops_the_instance_and_on_starts_it(rt: Lab) -> None:
    """`enabled 'off'` + reload_config: start_service opens no instance, so procd stops the
    daemon and keeps the service (with its trigger); the option deleted (on by default)
    brings a new daemon."""
    old = running_pid(rt)
    assert old is not None
    try:
        uci_apply(rt, "set oe.global.enabled=off")
        oelab.wait_until("procd drops the instance", lambda: running_pid(rt) is None, 30)
        oelab.wait_until(
            "the daemon exits", lambda: rt.router(f"kill -0 {old} 2>/dev/null").rc != 0, 30
        )
        svc = service(rt)
        assert "oe-routerd" not in svc.get("instances", {}), svc
        assert any(t[0] == "config.change" for t in svc["triggers"]), svc
        assert not rt.router("oe status").ok
    finally:
        uci_apply(rt, "delete oe.global.enabled")
    new = wait_daemon_ready(rt, old, "enabled again")
    assert oelab.status(rt)["daemon"]["enabled"] is True and new != old
