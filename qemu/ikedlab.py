"""OpenIKED in a booted lab: (re)start, stop and reconfigure the iked of a world host, read
its log and its SAs.

The world bundle's OpenIKED hosts (labkit.world: ``oe-iked`` with a raw ECDSA P-256 key,
``oe-iked-rsa`` with RSA-2048) start iked at boot with their own iked.conf, a passive
responder for the router. A test renders another one (``labkit.peers.render_iked_conf``),
``restart``s the host's iked with it and ``restore``s the host's own at the end. iked's
kernel interface is PF_KEY, whose SAs are XFRM states: ``esp_sas`` reads them from the
host's netns with ``ip xfrm state``; ``show_sa`` is iked's own view (`ikectl show sa`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from lab import LAB_STATE, Host, Lab, LabError
from labkit import peers, world

#: key type -> the OpenIKED host that holds a raw key of that type
HOSTS = {"ecdsa": "oe-iked", "rsa": "oe-iked-rsa"}


def conf(lab: Lab, netns: str, **kw: object) -> str:
    """iked.conf for ``netns``'s one policy with the router (``peers.render_iked_conf``
    keywords: active, ikesa, childsa, lifetime, ikelifetime)."""
    h = host(lab, netns)
    if not h.name:
        raise LabError(f"{netns} has no DNS name to use as iked's srcid")
    return peers.render_iked_conf(
        h.ipv4,
        world.ROUTER_WAN4,
        h.name,
        world.ROUTER_FQDN,
        **kw,  # type: ignore[arg-type]
    )


def host(lab: Lab, netns: str) -> Host:
    """An OpenIKED host as the world bundle lists it (not in the fixed lab plan)."""
    for h in lab.hosts:
        if h.netns == netns:
            return h
    raise LabError(f"no host {netns!r} in the world bundle")


def _script(netns: str, args: str) -> str:
    return f"LAB_STATE={LAB_STATE} sh /lab/bundle/hosts/{netns}/iked.sh {args}"


def restart(lab: Lab, netns: str, text: str | None = None) -> None:
    """Stop ``netns``'s iked (its netns's SAs and policies flushed) and start it with the
    iked.conf ``text`` (None: the host's own), waiting for its control socket."""
    state = f"{LAB_STATE}/{netns}"
    args = "start"
    if text is not None:
        (lab.run_dir / f"iked-{netns}.conf").write_text(text)
        args = f"start {state}/iked-test.conf"
        lab.world(f"cp /lab/iked-{netns}.conf {state}/iked-test.conf").check()
    res = lab.host(netns, _script(netns, args), timeout=60)
    if not res.ok:
        raise LabError(
            f"iked in {netns} did not start:\n{res.stderr.strip()}\n{log(lab, netns)[-2000:]}"
        )


def restore(lab: Lab, netns: str) -> None:
    """``netns``'s iked back on the host's own iked.conf (what the lab booted with)."""
    restart(lab, netns, None)


def stop(lab: Lab, netns: str) -> None:
    lab.host(netns, _script(netns, "stop")).check()


def log(lab: Lab, netns: str) -> str:
    """iked's log (``iked -dvv``: every exchange and the proposals it compares)."""
    return lab.world(f"cat {LAB_STATE}/{netns}/iked.log 2>/dev/null").stdout


def save_logs(lab: Lab) -> None:
    """Every OpenIKED host's logs (of every iked it ran, oldest first) copied to the run's
    logs/ (kept in a failed test's artifacts) as <netns>-iked.log."""
    lab.world(
        "; ".join(
            f"cat {LAB_STATE}/{ns}/iked-before.log {LAB_STATE}/{ns}/iked.log "
            f">/lab/logs/{ns}-iked.log 2>/dev/null"
            for ns in HOSTS.values()
        )
        + "; true"
    )


def show_sa(lab: Lab, netns: str) -> str:
    """iked's own SA table (``ikectl show sa``: IKE SAs, Child SAs and flows)."""
    sock = shlex.quote(f"{LAB_STATE}/{netns}/iked.sock")
    return lab.host(netns, f"ikectl -s {sock} show sa").check().stdout


@dataclass(frozen=True)
class EspSa:
    """One ESP SA in a kernel (``ip xfrm state``), without its keys."""

    src: str
    dst: str
    spi: str
    algorithms: tuple[str, ...]  #: the aead/enc/auth lines' algorithm names


def esp_sas(xfrm_state: str) -> list[EspSa]:
    """The ESP SAs of an ``ip xfrm state`` listing (key bytes are never kept)."""
    out = []
    for block in re.split(r"\n(?=src )", xfrm_state):
        m = re.match(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+)", block)
        if m:
            algs = re.findall(r"^\s*(?:aead|enc|auth-trunc|auth)\s+(\S+)", block, re.M)
            out.append(EspSa(m.group(1), m.group(2), m.group(3), tuple(algs)))
    return out


def host_sas(lab: Lab, netns: str) -> list[EspSa]:
    """The ESP SAs iked put in ``netns``'s kernel through PF_KEY."""
    return esp_sas(lab.host(netns, "ip xfrm state").check().stdout)


def router_sas(lab: Lab) -> list[EspSa]:
    return esp_sas(lab.router("ip xfrm state").check().stdout)
