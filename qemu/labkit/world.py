"""The lab's Internet as a bundle directory, generated fresh (keys included) per run.

``python -m labkit.world build OUTDIR`` or ``build(outdir) -> WorldInfo``.

Bundle layout (all paths relative to OUTDIR):
  world.json                  hosts, DNS names, expectations, router files (see WorldInfo)
  zones/*.zone                signed zone files; zones/trust-anchor.{ds,dnskey}
  router/trust-anchor.ds      root DS, zone-file format (". 3600 IN DS ...")
  router/trust-anchor.dnskey  root DNSKEY, zone-file format
  router/identity.key         router's ECDSA P-256 identity key, PKCS#8 PEM (-> /etc/oe/)
  router/identity.pub         its SPKI PEM (oe-sw trusts it for @router.example.test)
  lib/common.sh               shell helpers sourced by every start.sh
  hosts/<netns>/start.sh      starts the host's services; see labkit/README.md for the contract
  hosts/<netns>/stop.sh       stops them (kills the pids start.sh recorded)
  hosts/<netns>/www/index.html  the page naming the host
  hosts/<netns>/...           that host's daemon configs
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import secrets
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from labkit import keys as labkeys
from labkit import peers
from labkit.knot import render_knot_conf
from labkit.unbound import render_resolver_conf, render_root_hints
from labkit.zones import (
    Algorithm,
    Breakage,
    BreakKind,
    BuiltHierarchy,
    Denial,
    HierarchySpec,
    ZoneSpec,
    build_hierarchy,
    ipseckey,
    ipseckey_none,
)

NET4 = "203.0.113."
NET6 = "2001:db8:1::"
ROUTER_WAN4 = "203.0.113.2"
ROUTER_WAN6 = "2001:db8:1::2"
ROUTER_FQDN = "router.example.test"
NS_FQDN = "ns.test."
SW_FQDN = "sw.example.test"
RSA_FQDN = "rsa.example.test"
IKED_FQDN = "iked.example.test"  # OpenIKED, ECDSA P-256 raw key
IKED_RSA_FQDN = "iked-rsa.example.test"  # OpenIKED, RSA-2048 raw key
CAT_POOL = "100.64.13.1-100.64.13.200"  # oe-cat's inner addresses (libreswan rightaddresspool)


@dataclass(frozen=True)
class Host:
    """One netns on the lab's Internet.

    ``expected`` is what the LAN client should see when it talks to ``dns_name``
    through the router running OE: protected-null, protected-rsa, protected-sw,
    protected-iked (OpenIKED, FQDN identity and raw key),
    protected-cat (the router gets an inner address from its pool), clear, servfail;
    "infra" for ns/resolver.  ``ike_id`` is the IKE identity the peer presents (None:
    ID_NULL or no IKE).
    """

    netns: str
    v4: str
    v6: str
    role: str
    dns_name: str | None
    expected: str
    ike_id: str | None = None
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsName:
    """A name in the lab zones and what a validating resolver must conclude."""

    name: str
    security: str  # secure | insecure | bogus
    addresses: tuple[str, ...]
    ipseckey_alg: int | None  # algorithm of the published IPSECKEY, None if none
    expected: str  # outcome for a LAN client (see Host.expected)
    note: str = ""


@dataclass(frozen=True)
class RouterInfo:
    """What the router under test is given (paths relative to the bundle)."""

    wan_v4: str
    wan_v6: str
    identity_fqdn: str
    identity_key: str
    identity_pub: str
    identity_key_type: str
    trust_anchor_ds: str
    trust_anchor_dnskey: str
    resolver: str


@dataclass(frozen=True)
class WorldInfo:
    """The built bundle (also written, minus ``outdir``, as world.json)."""

    outdir: Path
    hosts: tuple[Host, ...]
    names: tuple[DnsName, ...]
    router: RouterInfo
    zones: dict[str, str]  # origin -> zone file (bundle-relative)
    created: str = field(default="")

    def host(self, netns: str) -> Host:
        for h in self.hosts:
            if h.netns == netns:
                return h
        raise KeyError(f"no host {netns!r} in the lab world")

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("outdir")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _h(netns: str, octet: int, role: str, name: str | None, expected: str, **kw: object) -> Host:
    return Host(netns, f"{NET4}{octet}", f"{NET6}{octet}", role, name, expected, **kw)  # type: ignore[arg-type]


HOSTS: tuple[Host, ...] = (
    _h("ns", 53, "ns", "ns.test", "infra", services=("knotd", "http")),
    _h("resolver", 54, "resolver", "resolver.example.test", "infra", services=("unbound", "http")),
    _h("oe-null", 10, "oe-null", "null.example.test", "protected-null", services=("pluto", "http")),
    _h(
        "oe-rsa",
        11,
        "oe-rsa",
        RSA_FQDN,
        "protected-rsa",
        ike_id=f"@{RSA_FQDN}",
        services=("pluto", "http"),
    ),
    _h(
        "oe-sw",
        12,
        "oe-sw",
        SW_FQDN,
        "protected-sw",
        ike_id=f"@{SW_FQDN}",
        services=("charon", "http"),
    ),
    _h("plain", 20, "plain", "plain.example.test", "clear", services=("http",)),
    _h("insecure", 21, "insecure", "www.insecure.test", "clear", services=("http",)),
    _h("bogus", 22, "bogus", "www.bogus.test", "servfail", services=("http",)),
    _h("ls-a", 30, "self-check", "a.example.test", "clear", services=("pluto", "http")),
    # clear-or-private for everyone: it answers the router's OE, so the router protects it
    _h("ls-b", 31, "self-check", "b.example.test", "protected-null", services=("pluto", "http")),
    # CAT: clear-or-private for everyone, with an address pool (an inner address per initiator)
    _h("oe-cat", 13, "oe-cat", None, "protected-cat", services=("pluto", "http")),
    # The policy-matrix peer: its group for the router is switched at run time (set-group.sh).
    _h("ls-m", 32, "oe-matrix", None, "matrix", services=("pluto", "http")),
    # OpenIKED (a third IKEv2 implementation, PF_KEY): raw ECDSA and RSA keys, FQDN ids;
    # iked.sh restarts it with another iked.conf (tests/qemu/test_iked_interop.py)
    _h(
        "oe-iked",
        14,
        "oe-iked",
        IKED_FQDN,
        "protected-iked",
        ike_id=f"@{IKED_FQDN}",
        services=("iked", "http"),
    ),
    _h(
        "oe-iked-rsa",
        15,
        "oe-iked",
        IKED_RSA_FQDN,
        "protected-iked",
        ike_id=f"@{IKED_RSA_FQDN}",
        services=("iked", "http"),
    ),
)


@dataclass(frozen=True)
class WorldKeys:
    """Fresh per build: peers' and the router's identity keys."""

    rsa: labkeys.RsaIdentity
    sw: labkeys.EcIdentity
    router: labkeys.EcIdentity
    iked: labkeys.EcIdentity
    iked_rsa: labkeys.RsaIdentity

    @staticmethod
    def generate() -> WorldKeys:
        ec, rsa = labkeys.new_ec, labkeys.new_rsa
        return WorldKeys(rsa(), ec(), ec(), ec(), rsa())


def _addr(octet: int) -> tuple[str, str]:
    return (f"{NET4}{octet}", f"{NET6}{octet}")


def _host_records(label: str, octet: int, *extra: str) -> list[str]:
    v4, v6 = _addr(octet)
    return [f"{label} A {v4}", f"{label} AAAA {v6}", *(f"{label} {e}" for e in extra)]


def _big_ipseckeys(count: int = 12) -> list[str]:
    """Random RSA-shaped IPSECKEYs: an RRset over 3 KB, so a UDP answer with a
    1232-byte EDNS buffer is truncated and the client must retry over TCP."""
    return [
        "big IPSECKEY "
        + ipseckey(labkeys.IPSECKEY_ALG_RSA, b"\x03\x01\x00\x01" + secrets.token_bytes(256), 10 + i)
        for i in range(count)
    ]


def zone_spec(keys: WorldKeys, ns_addresses: Sequence[str]) -> HierarchySpec:
    """The lab hierarchy.  Host tests may call this with the name server at a
    loopback address and serve the result with labkit.knot.KnotServer."""
    none = "IPSECKEY " + ipseckey_none()
    rsa_key = "IPSECKEY " + ipseckey(labkeys.IPSECKEY_ALG_RSA, keys.rsa.dns_key)
    sw_key = "IPSECKEY " + ipseckey(labkeys.IPSECKEY_ALG_ECDSA, keys.sw.dns_key)
    router_key = "IPSECKEY " + ipseckey(labkeys.IPSECKEY_ALG_ECDSA, keys.router.dns_key)
    iked_key = "IPSECKEY " + ipseckey(labkeys.IPSECKEY_ALG_ECDSA, keys.iked.dns_key)
    iked_rsa_key = "IPSECKEY " + ipseckey(labkeys.IPSECKEY_ALG_RSA, keys.iked_rsa.dns_key)
    www_bogus = ["www A 203.0.113.22", "www AAAA 2001:db8:1::22", f"www {none}"]
    bogus_targets = (("www", "A"), ("www", "AAAA"), ("www", "IPSECKEY"))
    example = [
        *_host_records("null", 10, none),
        *_host_records("rsa", 11, rsa_key),
        *_host_records("sw", 12, sw_key),
        *_host_records("iked", 14, iked_key),
        *_host_records("iked-rsa", 15, iked_rsa_key),
        *_host_records("plain", 20),
        *_host_records("a", 30),
        *_host_records("b", 31),
        *_host_records("resolver", 54),
        f"router A {ROUTER_WAN4}",
        f"router AAAA {ROUTER_WAN6}",
        f"router {router_key}",
        "cname1 CNAME cname2",
        "cname2 CNAME null",
        "alias CNAME key.nsec3.test.",
        "multi A 203.0.113.40",
        "multi A 203.0.113.41",
        "multi A 203.0.113.42",
        "multi AAAA 2001:db8:1::40",
        "multi AAAA 2001:db8:1::41",
        f"multi {none}",
        "v6only AAAA 2001:db8:1::10",
        f"v6only {none}",
        "big A 203.0.113.10",
        *_big_ipseckeys(),
    ]
    return HierarchySpec(
        zones=(
            ZoneSpec(".", algorithm=Algorithm.RSASHA256),
            ZoneSpec("test.", algorithm=Algorithm.ECDSAP256SHA256, denial=Denial.NSEC3),
            ZoneSpec("example.test.", tuple(example), algorithm=Algorithm.ED25519),
            ZoneSpec(
                "nsec3.test.",
                (
                    "www A 203.0.113.20",
                    "key A 203.0.113.10",
                    f"key {none}",
                    'x.ent TXT "below an empty non-terminal"',
                ),
                algorithm=Algorithm.RSASHA256,
                denial=Denial.NSEC3,
            ),
            ZoneSpec(
                "insecure.test.",
                ("www A 203.0.113.21", "www AAAA 2001:db8:1::21", f"www {none}"),
                algorithm=None,
            ),
            ZoneSpec(
                "bogus.test.",
                tuple(www_bogus),
                algorithm=Algorithm.ECDSAP256SHA256,
                breakage=Breakage(BreakKind.BAD_SIGNATURE, bogus_targets),
            ),
            ZoneSpec(
                "expired.test.",
                tuple(www_bogus),
                algorithm=Algorithm.ED25519,
                breakage=Breakage(BreakKind.EXPIRED_SIGNATURE, bogus_targets),
            ),
            ZoneSpec(
                "dsmismatch.test.",
                tuple(www_bogus),
                algorithm=Algorithm.ECDSAP256SHA256,
                breakage=Breakage(BreakKind.DS_MISMATCH),
            ),
            ZoneSpec(
                "otherkey.test.",
                tuple(www_bogus),
                algorithm=Algorithm.ED25519,
                breakage=Breakage(BreakKind.OTHER_ZONE_KEY, bogus_targets, "example.test."),
            ),
        ),
        ns_addresses=tuple(ns_addresses),
        nameserver=NS_FQDN,
    )


def dns_names() -> tuple[DnsName, ...]:
    """Names of interest and what validation must conclude about each."""
    a4 = _addr
    return (
        DnsName("null.example.test", "secure", a4(10), 0, "protected-null"),
        DnsName("rsa.example.test", "secure", a4(11), 2, "protected-rsa"),
        DnsName("sw.example.test", "secure", a4(12), 3, "protected-sw"),
        DnsName(IKED_FQDN, "secure", a4(14), 3, "protected-iked"),
        DnsName(IKED_RSA_FQDN, "secure", a4(15), 2, "protected-iked"),
        DnsName("plain.example.test", "secure", a4(20), None, "clear", "NODATA via NSEC"),
        DnsName("a.example.test", "secure", a4(30), None, "clear"),
        DnsName("b.example.test", "secure", a4(31), None, "clear"),
        DnsName("router.example.test", "secure", (ROUTER_WAN4, ROUTER_WAN6), 3, "infra"),
        DnsName("cname1.example.test", "secure", a4(10), 0, "protected-null", "CNAME chain"),
        DnsName("alias.example.test", "secure", (f"{NET4}10",), 0, "protected-null", "CNAME"),
        DnsName(
            "multi.example.test",
            "secure",
            ("203.0.113.40", "203.0.113.41", "203.0.113.42", "2001:db8:1::40", "2001:db8:1::41"),
            0,
            "dns-only",
            "several A and AAAA, no host behind",
        ),
        DnsName("v6only.example.test", "secure", ("2001:db8:1::10",), 0, "dns-only", "AAAA"),
        DnsName("big.example.test", "secure", (f"{NET4}10",), 2, "dns-only", "IPSECKEY TC/TCP"),
        DnsName("www.nsec3.test", "secure", (f"{NET4}20",), None, "clear", "NODATA via NSEC3"),
        DnsName("key.nsec3.test", "secure", (f"{NET4}10",), 0, "protected-null", "NSEC3 zone"),
        DnsName("www.insecure.test", "insecure", a4(21), 0, "clear", "key in unsigned zone"),
        DnsName("www.bogus.test", "bogus", a4(22), 0, "servfail", "bad signature"),
        DnsName("www.expired.test", "bogus", a4(22), 0, "servfail", "expired signature"),
        DnsName("www.dsmismatch.test", "bogus", a4(22), 0, "servfail", "DS mismatch"),
        DnsName("www.otherkey.test", "bogus", a4(22), 0, "servfail", "key of another zone"),
    )


_START_HEAD = """#!/bin/sh
# start.sh for lab host {netns} ({role}): run as root INSIDE netns {netns}.
# Starts {services} detached, waits until ready, exits 0 (non-zero + log tail on failure).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../lib/common.sh"
lab_prepare {netns} "$HERE"
"""

_STOP = """#!/bin/sh
# stop.sh for lab host {netns}: kill what start.sh started (pid files in the state dir).
STATE="${{LAB_STATE:-/run/lab}}/{netns}"
for p in "$STATE"/*.pid; do
    [ -f "$p" ] || continue
    kill "$(cat "$p")" 2>/dev/null || true
    rm -f "$p"
done
"""


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)


def _write_host(outdir: Path, host: Host, body: str, files: dict[str, str | bytes]) -> None:
    hdir = outdir / "hosts" / host.netns
    page = (
        f"<!doctype html><title>{host.netns}</title>"
        f"<h1>lab host {host.netns}</h1><p>name={host.dns_name} role={host.role} "
        f"v4={host.v4} v6={host.v6}</p>\n"
    )
    _write(hdir / "www" / "index.html", page)
    _write(hdir / "www" / "host.txt", f"{host.netns}\n")
    for rel, content in files.items():
        _write(hdir / rel, content, 0o600 if rel.endswith((".key", ".p12", ".pass")) else 0o644)
    head = _START_HEAD.format(
        netns=host.netns, role=host.role, services=", ".join(host.services) or "nothing"
    )
    _write(
        hdir / "start.sh",
        head + body + f"lab_http {shlex.quote(host.v4)} {shlex.quote(host.v6)}\n",
        0o755,
    )
    _write(hdir / "stop.sh", _STOP.format(netns=host.netns), 0o755)


def _libreswan_host(
    outdir: Path,
    host: Host,
    policies: dict[str, list[str]],
    rsa: labkeys.RsaIdentity | None = None,
    address_pool: str | None = None,
) -> None:
    files: dict[str, str | bytes] = {
        "ipsec.conf": peers.render_libreswan_conf(
            host.v4, policies, rsa, host.dns_name, address_pool
        ),
        "ipsec.secrets": "",
    }
    for group, text in peers.render_policy_files(policies).items():
        files[f"ipsec.d/policies/{group}"] = text
    if rsa is not None:
        password = secrets.token_hex(8)
        files["hostkey.p12"] = labkeys.pkcs12_for_nss(
            rsa.key, host.dns_name or host.netns, password.encode()
        )
        files["hostkey.p12.pass"] = password
        files["hostkey.pub"] = rsa.libreswan_pubkey + "\n"
    groups = " ".join(g for g in peers.OE_GROUPS if policies.get(g) and g not in ("clear", "block"))
    _write_host(outdir, host, f"lab_pluto {groups}\n", files)


def _iked_host(
    outdir: Path,
    host: Host,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    router_key: ec.EllipticCurvePrivateKey,
) -> None:
    """An OpenIKED host: its /etc/iked tree under iked/ (bind-mounted over /etc/iked in
    iked's own mount namespace, so each host has its own keys) and iked.conf, a passive
    responder for the router (IKE SA: AES-GCM-256, ECP-256 or Curve25519; Child SA: iked's
    defaults, all that PF_KEY lets it install; peers.IKED_*).
    ``iked.sh start [CONF] | stop`` restarts or stops it (labkit/README.md)."""
    if not host.dns_name:
        raise ValueError(f"iked host {host.netns} needs a DNS name (its srcid)")
    files: dict[str, str | bytes] = {
        "iked.conf": peers.render_iked_conf(host.v4, ROUTER_WAN4, host.dns_name, ROUTER_FQDN),
        "iked/private/local.key": labkeys.private_pem(key),
        "iked/local.pub": labkeys.public_pem(key),
        f"iked/pubkeys/fqdn/{ROUTER_FQDN}": labkeys.public_pem(router_key),
    }
    _write_host(outdir, host, "lab_iked\n", files)
    _write(outdir / "hosts" / host.netns / "iked.sh", _IKED_SH, 0o755)


# iked.sh for the OpenIKED hosts: run INSIDE the host's netns with LAB_STATE set, like start.sh.
_IKED_SH = """#!/bin/sh
# iked.sh start [CONF] | stop: stop the host's iked (flushing the netns's SAs and policies),
# then start it again with CONF (default: the host's own iked.conf) unless asked to stop.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../lib/common.sh"
LAB_HOST=$(basename "$HERE")
STATE="${LAB_STATE:-/run/lab}/$LAB_HOST"
export STATE LAB_HOST
lab_iked_stop
case "${1:-}" in
start) lab_iked "${2:-$STATE/iked.conf}" ;;
stop) ;;
*) echo "iked.sh: start [CONF] | stop" >&2; exit 2 ;;
esac
"""


# set-group.sh for the matrix peer: run INSIDE its netns with LAB_STATE set, like start.sh.
_SET_GROUP = """#!/bin/sh
# set-group.sh VARIANT: libreswan's policy group for the router becomes VARIANT (clear,
# clear-or-private, private-or-clear, private, block; or "matrix", one address per case):
# pluto is stopped, the pre-rendered groups/VARIANT replaces ipsec.conf and
# ipsec.d/policies, pluto starts again and the script returns once its conns are loaded.
# A restart, not a reread: libreswan 4.10 has no command that swaps a conn's policy group
# in place.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../lib/common.sh"
G=$1
[ -d "$HERE/groups/$G" ] || { echo "set-group.sh: unknown group $G" >&2; exit 2; }
LAB_HOST=@NETNS@
STATE="${LAB_STATE:-/run/lab}/@NETNS@"
export STATE LAB_HOST
lab_pluto_stop
rm -rf "$STATE/ipsec.d/policies"
mkdir -p "$STATE/ipsec.d/policies"
cp "$HERE/groups/$G/policies/"* "$STATE/ipsec.d/policies/"
sed "s|@STATE@|$STATE|g" "$HERE/groups/$G/ipsec.conf" >"$STATE/ipsec.conf"
lab_pluto $(cat "$HERE/groups/$G/wait")
echo "$G" >"$STATE/group"
"""


# The policy matrix: libreswan's group for the router at address MATRIX_BASE + n, for case
# n = 5 * (index of the router's group) + (index of libreswan's group), groups in OE_GROUPS
# order. One pluto answers all 25 cells at once (no restart between cases).
MATRIX_BASE = 100


def matrix_address(router_group: str, peer_group: str) -> str:
    """The matrix peer's address for (the router's group, libreswan's group)."""
    n = 5 * peers.OE_GROUPS.index(router_group) + peers.OE_GROUPS.index(peer_group)
    return f"{NET4}{MATRIX_BASE + n}"


def _matrix_host(outdir: Path, host: Host, router: str) -> None:
    """A libreswan host for the policy matrix and for peer-restart tests.

    Variants under groups/: "matrix" (25 local addresses, one per cell, see
    matrix_address) and one per OE group (the host's own address only), switched at
    run time with ``hosts/<netns>/set-group.sh VARIANT`` (pluto restart, ~1.5 s).
    """
    files: dict[str, str | bytes] = {"ipsec.secrets": ""}
    for group in peers.OE_GROUPS:
        policies = {group: [f"{router}/32"]}
        files[f"groups/{group}/ipsec.conf"] = peers.render_libreswan_conf(host.v4, policies)
        for g, text in peers.render_policy_files(policies).items():
            files[f"groups/{group}/policies/{g}"] = text
        files[f"groups/{group}/wait"] = f"{group}\n"
    cases = [(matrix_address(r, p), p) for r in peers.OE_GROUPS for p in peers.OE_GROUPS]
    # The router's /31 (router and one unused address), not its /32: see render_libreswan_matrix.
    router_net = str(ipaddress.ip_network(f"{router}/31", strict=False))
    conf, policy_files = peers.render_libreswan_matrix(router_net, cases)
    files["groups/matrix/ipsec.conf"] = conf
    for name, text in policy_files.items():
        files[f"groups/matrix/policies/{name}"] = text
    files["groups/matrix/wait"] = "".join(f"{n}\n" for n in policy_files)
    addrs = "\n".join(f"addr add {a}/32 dev eth0" for a, _ in cases)
    _write_host(
        outdir,
        host,
        f"ip -b - <<'EOF'\n{addrs}\nEOF\n"
        'mkdir -p "$STATE/ipsec.d"\n'
        'LAB_STATE="${LAB_STATE:-/run/lab}" sh "$HERE/set-group.sh" matrix\n'
        # one server for all 25 addresses (lab_http below serves the host's own address)
        'lab_spawn httpm python3 -m http.server 8080 --directory "$STATE/www"\n',
        files,
    )
    _write(
        outdir / "hosts" / host.netns / "set-group.sh",
        _SET_GROUP.replace("@NETNS@", host.netns),
        0o755,
    )


def build(
    outdir: Path,
    ns_addresses: Sequence[str] = ("203.0.113.53", "2001:db8:1::53"),
    now: dt.datetime | None = None,
    sw_datapath: str = "kernel",
) -> WorldInfo:
    """Write the whole world bundle to ``outdir`` (created; existing files replaced).

    ``ns_addresses``: where ns.test. is (glue, root hints); ``sw_datapath``:
    "kernel" (world VM) or "libipsec" (a host without kernel ESP).
    """
    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    keys = WorldKeys.generate()
    hier: BuiltHierarchy = build_hierarchy(zone_spec(keys, ns_addresses), outdir / "zones", now)
    hosts = {h.netns: h for h in HOSTS}
    _write(outdir / "lib" / "common.sh", (Path(__file__).parent / "common.sh").read_text())

    # router files
    rdir = outdir / "router"
    _write(rdir / "trust-anchor.ds", hier.trust_anchor_ds.read_text())
    _write(rdir / "trust-anchor.dnskey", hier.trust_anchor_dnskey.read_text())
    _write(rdir / "identity.key", labkeys.private_pem(keys.router.key), 0o600)
    _write(rdir / "identity.pub", labkeys.public_pem(keys.router.key))

    # ns: knot serving the signed zones (copied next to knot.conf at start)
    zone_files: dict[str, str | bytes] = {
        f"zones/{z.path.name}": z.path.read_text() for z in hier.zones.values()
    }
    knot_conf = render_knot_conf(
        hier, [f"{a}@53" for a in ns_addresses], "@STATE@", "@STATE@/zones"
    )
    n_zones = len(hier.zones)
    _write_host(
        outdir,
        hosts["ns"],
        'mkdir -p "$STATE/db"\n'
        'lab_spawn knotd knotd -c "$STATE/knot.conf"\n'
        f'lab_wait 20 "knotd zones" "$STATE/knotd.log" lab_knot_loaded {n_zones}\n',
        {"knot.conf": knot_conf, **zone_files},
    )

    # resolver: recursive, non-validating unbound from the lab root
    _write_host(
        outdir,
        hosts["resolver"],
        'lab_spawn unbound unbound -d -c "$STATE/unbound.conf"\n'
        'lab_wait 20 "unbound" "$STATE/unbound.log" '
        'unbound-control -c "$STATE/unbound.conf" status\n',
        {
            "unbound.conf": render_resolver_conf(
                "@STATE@", "@STATE@/root.hints", (hosts["resolver"].v4, hosts["resolver"].v6)
            ),
            "root.hints": render_root_hints(NS_FQDN, ns_addresses),
        },
    )

    everyone = ["0.0.0.0/0"]
    _libreswan_host(outdir, hosts["oe-null"], {"clear-or-private": everyone})
    _libreswan_host(outdir, hosts["oe-rsa"], {"clear-or-private": everyone}, rsa=keys.rsa)
    _libreswan_host(outdir, hosts["ls-a"], {"private-or-clear": [f"{hosts['ls-b'].v4}/32"]})
    _libreswan_host(outdir, hosts["ls-b"], {"clear-or-private": everyone})
    _libreswan_host(outdir, hosts["oe-cat"], {"clear-or-private": everyone}, address_pool=CAT_POOL)
    _matrix_host(outdir, hosts["ls-m"], ROUTER_WAN4)

    sw = hosts["oe-sw"]
    _write_host(
        outdir,
        sw,
        _SW_START,
        {
            "strongswan.conf": peers.render_strongswan_conf(sw_datapath),
            "swanctl/swanctl.conf": peers.render_swanctl_conf(
                sw.v4, SW_FQDN, ROUTER_FQDN, "sw.pub", "router.pub"
            ),
            "swanctl/private/sw.key": labkeys.private_pem(keys.sw.key),
            "swanctl/pubkey/sw.pub": labkeys.public_pem(keys.sw.key),
            "swanctl/pubkey/router.pub": labkeys.public_pem(keys.router.key),
        },
    )
    _iked_host(outdir, hosts["oe-iked"], keys.iked.key, keys.router.key)
    _iked_host(outdir, hosts["oe-iked-rsa"], keys.iked_rsa.key, keys.router.key)
    for name in ("plain", "insecure", "bogus"):
        _write_host(outdir, hosts[name], "", {})

    info = WorldInfo(
        outdir=outdir,
        hosts=HOSTS,
        names=dns_names(),
        router=RouterInfo(
            wan_v4=ROUTER_WAN4,
            wan_v6=ROUTER_WAN6,
            identity_fqdn=ROUTER_FQDN,
            identity_key="router/identity.key",
            identity_pub="router/identity.pub",
            identity_key_type="ecdsa-p256",
            trust_anchor_ds="router/trust-anchor.ds",
            trust_anchor_dnskey="router/trust-anchor.dnskey",
            resolver=hosts["resolver"].v4,
        ),
        zones={o: f"zones/{z.path.name}" for o, z in hier.zones.items()},
        created=hier.inception.isoformat(),
    )
    _write(outdir / "world.json", info.to_json())
    return info


# oe-sw: charon from the separate strongSwan root (SWROOT, default /opt/swroot),
# in a private mount namespace so its /run tmpfs and bind mounts stay its own.
_SW_START = r"""SWROOT=${SWROOT:-/opt/swroot}
export SWROOT
unshare --mount --propagation private sh -eu -c '
    R=$SWROOT
    [ "$R" = / ] && R=
    mkdir -p "$R$STATE" "$R/run" "$R/proc" "$R/dev"
    if [ -n "$R" ]; then
        mount --bind "$STATE" "$R$STATE"
        mount -t proc proc "$R/proc"
        mount --bind /dev "$R/dev"
    fi
    mount -t tmpfs tmpfs "$R/run"
    STRONGSWAN_CONF=$STATE/strongswan.conf setsid chroot "$SWROOT" /usr/lib/ipsec/charon \
        >"$STATE/charon.out" 2>&1 </dev/null &
    echo $! >"$STATE/charon.pid"
    i=200
    while [ ! -S "$STATE/charon.vici" ]; do
        i=$((i - 1)); [ $i -gt 0 ] || { tail -n 30 "$STATE/charon.out" >&2; exit 1; }
        sleep 0.1
    done
    chroot "$SWROOT" swanctl --load-all --file "$STATE/swanctl/swanctl.conf" \
        --uri "unix://$STATE/charon.vici" >"$STATE/swanctl-load.log" 2>&1 ||
        { cat "$STATE/swanctl-load.log" >&2; exit 1; }
' || lab_fail "charon did not start or did not load swanctl.conf" "$STATE/charon.log"
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.world", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the world bundle to OUTDIR")
    b.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        info = build(args.outdir)
        print(f"world bundle written to {info.outdir} ({len(info.hosts)} hosts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
