"""Reload on the router as its owner runs it (procd, uci, logd): an added listen address,
and the CLI with a custom control socket and a broken /etc/config/oe.

Why (issue 13, "Reload bugs"): adding a DNS front listen address while keeping the
existing one was refused with "Address already in use", because the daemon itself held
the old address; and with a non-default ``control_socket`` the CLI reported "daemon not
running" once the file had an error, exactly when `oe reload` should list the problems.
tests/host/test_cli_broken_config.py is the host version of the second; this one runs
the installed package under procd in the session lab's router.

Observable: the daemon's config generation, pid and last reload (`oe status --json`),
the sockets (`ss`), DNS answers on both listen addresses (the LAN client's dig on the
added LAN address, dnspython on the router on the loopback one), logd's lines, and the
CLI's exit status and output. Each test starts its own daemon and leaves /etc/config/oe
as start_daemon wrote it, the daemon stopped.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-reload-runtime.json"
CONFIG = "/etc/config/oe"
LOOPBACK = "127.0.0.1:5335"  # files/etc/config/oe's first listen address
CUSTOM_SOCKET = "/var/run/oe-lab/custom.sock"
NAME = "plain.example.test"  # no key: the front answers at once

#: one A query to the front at argv[1]:argv[2] with dnspython (the package's own), on the
#: router, which has no dig: "rcode address..." out
_ASK = (
    "import sys, dns.message, dns.query, dns.rcode; "
    "q = dns.message.make_query(sys.argv[3], 'A'); "
    "r = dns.query.udp(q, sys.argv[1], port=int(sys.argv[2]), timeout=5); "
    "print(dns.rcode.to_text(r.rcode()), *[i.address for s in r.answer for i in s])"
)


def _status(lab: Lab) -> dict[str, Any]:
    return dict(json.loads(lab.router("oe status --json").check().stdout))


def _reload_and_wait(lab: Lab, change: str, gen: int) -> dict[str, Any]:
    """``change`` (uci commands), `uci commit oe`, `/etc/init.d/oe reload` (procd's
    reload_service: SIGHUP), until the daemon reports a reload after generation ``gen``."""
    lab.router(f"{change} && uci commit oe && /etc/init.d/oe reload").check()
    return oelab.wait_until(
        f"a reload after config generation {gen}",
        lambda: (d := _status(lab)["daemon"])["last_reload"]
        and d["last_reload"]["generation"] > gen
        and d,
        60,
    )


def _procd_pid(lab: Lab) -> int:
    return int(lab.router("pgrep -x oe-routerd").check().stdout.split()[0])


def test_reload_with_an_added_listen_address_answers_on_both(
    running_daemon: Lab, figures: dict[str, Any]
) -> None:
    lab = running_daemon
    added = f"{lab.plan.router_lan4}:5335"
    pid = _procd_pid(lab)
    before = _status(lab)["daemon"]
    assert before["pid"] == pid
    gen = before["config_generation"]
    lines_before = lab.router("logread | wc -l").check().stdout.strip()
    try:
        after = _reload_and_wait(lab, f"uci add_list oe.dns.listen={shlex.quote(added)}", gen)
        figures["listen_added_reload"] = after["last_reload"]
        assert after["last_reload"]["accepted"] is True, after["last_reload"]
        assert after["config_generation"] == gen + 1 and after["pid"] == pid, after
        listen = lab.router("uci get oe.dns.listen").check().stdout.split()
        assert LOOPBACK in listen and added in listen, listen

        def both_bound() -> bool:
            udp = lab.router("ss -lnu").check().stdout
            tcp = lab.router("ss -lnt").check().stdout
            return all(f"{a} " in udp and f"{a} " in tcp for a in (LOOPBACK, added))

        oelab.wait_until(f"the front on {LOOPBACK} and {added}, UDP and TCP", both_bound, 30)
        # the added address, from the LAN client
        lan = lab.client(f"dig +time=5 +tries=2 @{lab.plan.router_lan4} -p 5335 {NAME} A")
        assert "status: NOERROR" in lan.check().stdout, lan.stdout
        assert lab.plan.host("plain").ipv4 in lan.stdout, lan.stdout
        # the kept address, on the router
        ask = f"python3 -c {shlex.quote(_ASK)} 127.0.0.1 5335 {NAME}"
        kept = lab.router(ask).check().stdout.split()
        assert kept == ["NOERROR", lab.plan.host("plain").ipv4], kept
        # and logd has no bind failure since the reload
        log = lab.router(f"logread | tail -n +{int(lines_before) + 1}").check().stdout
        assert "Address already in use" not in log, log[-3000:]
        assert _procd_pid(lab) == pid
    finally:
        back = _reload_and_wait(lab, f"uci del_list oe.dns.listen={shlex.quote(added)}", gen + 1)
        assert back["last_reload"]["accepted"] is True, back["last_reload"]
    oelab.wait_until(
        f"{added} closed again",
        lambda: f"{added} " not in lab.router("ss -lnu").check().stdout,
        30,
    )


@pytest.fixture
def custom_socket(lab: Lab) -> Iterator[Lab]:
    """The daemon under procd with its control socket at CUSTOM_SOCKET (named only in
    /etc/config/oe); the file start_daemon wrote is put back before the stop."""
    oelab.start_daemon(lab, options={"global.control_socket": CUSTOM_SOCKET})
    try:
        yield lab
    finally:
        lab.router(f"cp /lab/oe.conf {CONFIG}")
        oelab.stop_daemon(lab)


def test_cli_with_a_custom_socket_reaches_the_daemon_through_a_broken_config(
    custom_socket: Lab, figures: dict[str, Any]
) -> None:
    lab = custom_socket
    pid = _procd_pid(lab)
    assert lab.router(f"[ -S {CUSTOM_SOCKET} ]").ok
    gen = _status(lab)["daemon"]["config_generation"]

    # a value out of range: the file still parses
    lab.router("uci set oe.ike.retransmit_tries=99 && uci commit oe").check()
    line = lab.router(f"grep -n retransmit_tries {CONFIG}").check().stdout.split(":")[0]
    status = lab.router("oe status --json")
    assert status.ok, status.stdout + status.stderr
    assert json.loads(status.stdout)["daemon"]["pid"] == pid
    assert lab.router("oe status").check().stdout.startswith("oe-routerd ")
    refused = lab.router("oe reload")
    figures["reload_out_of_range"] = refused.stdout
    assert refused.rc == 1, refused.stdout + refused.stderr
    out = refused.stdout.splitlines()
    assert any(ln.startswith(f"{CONFIG}:{line}: oe.ike.retransmit_tries: '99'") for ln in out), out
    assert out[-1] == f"reload refused: 1 problem(s); config generation {gen} keeps running"

    # a syntax error: an unterminated quote on the file's last line
    lab.router(f'printf "\\toption hold_limit \'unterminated\\n" >> {CONFIG}').check()
    last = lab.router(f"wc -l < {CONFIG}").check().stdout.strip()
    status = lab.router("oe status --json")
    assert status.ok, status.stdout + status.stderr
    assert json.loads(status.stdout)["daemon"]["pid"] == pid
    broken = lab.router("oe reload")
    figures["reload_syntax_error"] = broken.stdout
    assert broken.rc == 1, broken.stdout + broken.stderr
    assert f"{CONFIG}:{last}:" in broken.stdout and "unterminated" in broken.stdout, broken.stdout
    assert broken.stdout.splitlines()[-1].endswith(f"config generation {gen} keeps running")

    # the file fixed: accepted, same process
    lab.router(f"cp /lab/oe.conf {CONFIG}").check()
    accepted = lab.router("oe reload")
    assert (accepted.rc, accepted.stdout) == (
        0,
        f"reload accepted: config generation {gen + 1} is active\n",
    ), accepted.stdout + accepted.stderr
    assert _status(lab)["daemon"]["pid"] == pid == _procd_pid(lab)
