"""oe-routerd --syslog against OpenWrt's real logd and logread (qemu/userland.py builds them).

logd has no option for its socket: /dev/log is compiled in, and it reaches ubusd (which
logread asks) at libubus's default path. So the test gives them a mount namespace of their
own (``unshare --mount``): a tmpfs on /dev and on /run, an empty file over /proc/kmsg (logd
reads the kernel log there and would take the host's lines). In it run ubusd, logd and the
daemon exactly as /etc/init.d/oe starts it (``--syslog``, the default /dev/log), and
``logread`` shows what logd kept: ``daemon.notice oe-routerd[pid]: daemon: ...`` for the
start, ``daemon.info`` for a SIGHUP, ``daemon.warn`` for the refused reload.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import oe_router
from oe_router import __version__

if TYPE_CHECKING:
    from userland import UserlandBuild

pytestmark = pytest.mark.host

SETUP = """set -e
mount --bind {kmsg} /proc/kmsg
mount -t tmpfs -o mode=0755 tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/urandom c 1 9
mount -t tmpfs tmpfs /run
mkdir -p /run/ubus
echo ready
exec sleep 600
"""

#: the oe_router this test imports: the daemon runs the same
SRC = Path(oe_router.__file__).resolve().parents[1]
#: logread's ctime() in front of each line: "Sun Dec  6 09:34:04 2026 "
CTIME = re.compile(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} ")

CONFIG = """config oe 'global'
\toption enabled '0'
\toption log_level '{level}'
\toption control_socket '{socket}'
"""


@dataclass
class Box:
    """A mount namespace with its own /dev/log (logd's) and ubusd."""

    ul: UserlandBuild
    holder: subprocess.Popen[bytes]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *args]

    def start(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        env = self.ul.env()
        env["PYTHONPATH"] = str(SRC)  # entering the namespace moves the cwd to its /
        with log.open("ab") as out:
            proc = subprocess.Popen(self.cmd(*args), stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def logread(self) -> list[str]:
        res = subprocess.run(
            self.cmd(str(self.ul.tool("logread"))),
            capture_output=True,
            text=True,
            env=self.ul.env(),
            timeout=20,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()


@pytest.fixture
def box(
    openwrt_userland: UserlandBuild, tmp_path: Path, poll: Callable[..., bool]
) -> Iterator[Box]:
    ul = openwrt_userland
    kmsg = tmp_path / "kmsg"
    kmsg.write_bytes(b"")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SETUP.format(kmsg=kmsg)],
        stdout=subprocess.PIPE,
    )
    b = Box(ul, holder)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        b.start(str(ul.tool("ubusd")), log=tmp_path / "ubusd.log")
        ns_root = Path(f"/proc/{holder.pid}/root")
        assert poll(lambda: (ns_root / "run/ubus/ubus.sock").exists(), timeout=20)
        b.start(str(ul.tool("logd")), "-S", "64", log=tmp_path / "logd.log")
        assert poll(lambda: (ns_root / "dev/log").exists(), timeout=20)
        assert poll(lambda: "connected to ubus" in (tmp_path / "logd.log").read_text(), 20)
        yield b
    finally:
        for p in reversed(b.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        holder.kill()
        holder.wait(timeout=10)


def test_logread_shows_each_line_at_its_priority_tagged_with_the_pid(
    box: Box, tmp_path: Path, poll: Callable[..., bool]
) -> None:
    cfg = tmp_path / "oe"
    sock = tmp_path / "control.sock"
    cfg.write_text(CONFIG.format(level="info", socket=sock))
    daemon = box.start(
        *(sys.executable, "-m", "oe_router.daemon", "--config", str(cfg), "--syslog"),
        "--no-ubus",
        log=tmp_path / "oe-routerd.stderr",
    )
    pid = daemon.pid  # nsenter execs the daemon: same process
    tag = f"oe-routerd[{pid}]: "

    def mine() -> list[str]:
        return [ln for ln in box.logread() if tag in ln]

    def has(text: str) -> bool:
        return daemon.poll() is not None or any(text in ln for ln in mine())

    assert poll(lambda: has(" running (pid "), timeout=60)
    assert daemon.poll() is None, (tmp_path / "oe-routerd.stderr").read_text()
    os.kill(pid, signal.SIGHUP)  # a good file: info lines
    assert poll(lambda: has("reload accepted"), timeout=30), mine()
    cfg.write_text(CONFIG.format(level="chatty", socket=sock))
    os.kill(pid, signal.SIGHUP)  # a bad one: warnings
    assert poll(lambda: has("keeping config generation"), timeout=30), mine()
    daemon.terminate()
    assert daemon.wait(30) == 0
    assert poll(lambda: has(f"{tag}daemon: stopped"), timeout=20), mine()

    lines = [CTIME.sub("", ln) for ln in mine()]
    text = "\n".join(lines)
    assert f"daemon.notice {tag}daemon: oe-routerd {__version__} running (pid {pid}," in text
    assert f"daemon.info {tag}daemon: SIGHUP: reloading {cfg}" in lines, lines
    assert f"daemon.notice {tag}daemon: reload accepted: config generation 2" in lines, lines
    refused = [ln for ln in lines if "reload refused" in ln]
    warn = f"daemon.warn {tag}daemon: reload refused: "
    assert refused and all(ln.startswith(warn) for ln in refused), refused
    assert any("log_level" in ln and "chatty" in ln for ln in refused), refused
    assert f"daemon.notice {tag}daemon: stopped" in lines, lines
    assert not [ln for ln in lines if not ln.startswith("daemon.")], lines  # facility daemon
    assert (tmp_path / "oe-routerd.stderr").read_text() == ""  # nothing left for procd
