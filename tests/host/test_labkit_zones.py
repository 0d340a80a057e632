"""The lab's DNSSEC hierarchy judged by an independent validator (unbound).

The world bundle's own ns/start.sh (knotd) and resolver/start.sh (recursive,
non-validating unbound from the lab root) run in a netns with the lab's
addresses; unbound-host validates from the bundle's trust anchor file.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.knot import KnotServer
from labkit.netns import in_ns, netns
from labkit.unbound import render_validating_stub_conf
from labkit.zones import build_hierarchy

pytestmark = pytest.mark.host

NEEDED = ("knotd", "knotc", "kdig", "unbound", "unbound-host", "unbound-control", "ip")


@pytest.fixture(scope="module")
def lab_dns(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, world.WorldInfo, Path]]:
    missing = [t for t in NEEDED if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"missing host tools {missing}: apt-get install $(cat scripts/apt-packages.txt)"
        )
    base = tmp_path_factory.mktemp("labdns")
    info = world.build(base / "bundle")
    state = base / "state"
    env = {"LAB_STATE": str(state)}
    addrs = ["203.0.113.53", "203.0.113.54", "2001:db8:1::53", "2001:db8:1::54"]
    with netns("dns", addrs) as ns:
        started = []
        try:
            for host in ("ns", "resolver"):
                res = in_ns(ns, ["sh", str(info.outdir / "hosts" / host / "start.sh")], env)
                assert res.returncode == 0, f"{host}/start.sh failed: {res.stderr}"
                started.append(host)
            yield ns, info, state
        finally:
            for host in started:
                in_ns(ns, ["sh", str(info.outdir / "hosts" / host / "stop.sh")], env)


def _validate(ns: str, info: world.WorldInfo, state: Path, name: str, rdtype: str) -> str:
    conf = state / "stub.conf"
    if not conf.exists():
        anchor = info.outdir / info.router.trust_anchor_ds
        conf.write_text(render_validating_stub_conf("203.0.113.54", str(anchor)))
    res = in_ns(ns, ["unbound-host", "-C", str(conf), "-v", "-t", rdtype, name], timeout=30)
    return res.stdout + res.stderr


@pytest.mark.parametrize("dn", world.dns_names(), ids=lambda d: d.name)
def test_names_validate_as_declared(
    lab_dns: tuple[str, world.WorldInfo, Path], dn: world.DnsName
) -> None:
    """Every lab name's A (and IPSECKEY) answer has the declared DNSSEC status."""
    ns, info, state = lab_dns
    types = ["A", "IPSECKEY"] if dn.ipseckey_alg is not None or dn.security != "bogus" else ["A"]
    if all(":" in a for a in dn.addresses):
        types[0] = "AAAA"
    for rdtype in types:
        out = _validate(ns, info, state, dn.name, rdtype)
        if dn.security == "secure":
            assert "(secure)" in out, f"{dn.name} {rdtype}: {out}"
        elif dn.security == "insecure":
            assert "(insecure)" in out, f"{dn.name} {rdtype}: {out}"
        else:
            assert "BOGUS" in out, f"{dn.name} {rdtype}: {out}"
        if rdtype in ("A", "AAAA") and dn.security != "bogus":
            for addr in dn.addresses:
                if (":" in addr) == (rdtype == "AAAA"):
                    assert addr in out, f"{dn.name}: {addr} missing in {out}"


def test_secure_nodata_nsec_and_nsec3(lab_dns: tuple[str, world.WorldInfo, Path]) -> None:
    """No IPSECKEY is a *secure* denial, in an NSEC zone and in an NSEC3 zone."""
    ns, info, state = lab_dns
    for name in ("plain.example.test", "www.nsec3.test"):
        out = _validate(ns, info, state, name, "IPSECKEY")
        assert "(secure)" in out and "no" in out.lower(), f"{name}: {out}"
    out = _validate(ns, info, state, "nope.nsec3.test", "A")
    assert "NXDOMAIN" in out and "(secure)" in out, out


def test_big_rrset_truncates_over_udp(lab_dns: tuple[str, world.WorldInfo, Path]) -> None:
    """big.example.test IPSECKEY does not fit 1232 bytes: TC over UDP, whole over TCP."""
    ns, _info, _state = lab_dns
    base = ["kdig", "@203.0.113.53", "big.example.test", "IPSECKEY", "+dnssec", "+bufsize=1232"]
    udp = in_ns(ns, [*base, "+notcp", "+ignore"])
    assert " tc" in udp.stdout.split("Flags:")[1].split(";")[0], udp.stdout
    tcp = in_ns(ns, [*base, "+tcp"])
    assert tcp.stdout.count("\tIPSECKEY\t") == 12, tcp.stdout


def test_resolver_does_not_validate(lab_dns: tuple[str, world.WorldInfo, Path]) -> None:
    """The lab resolver passes bogus data on (no AD, no SERVFAIL): the router must judge."""
    ns, _info, _state = lab_dns
    res = in_ns(ns, ["kdig", "@203.0.113.54", "www.bogus.test", "A", "+dnssec"])
    assert "NOERROR" in res.stdout and "203.0.113.22" in res.stdout, res.stdout
    assert " ad" not in res.stdout.split("Flags:")[1].split(";")[0], res.stdout


def test_knot_server_on_loopback_port(tmp_path: Path) -> None:
    """KnotServer serves a built hierarchy on 127.0.0.1:<port> for host DNS tests."""
    hier = build_hierarchy(
        world.zone_spec(world.WorldKeys.generate(), ["127.0.0.1"]), tmp_path / "z"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with KnotServer(hier, "127.0.0.1", port, tmp_path / "run"):
        res = subprocess.run(
            ["kdig", "@127.0.0.1", "-p", str(port), "example.test", "DS", "+dnssec", "+norec"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    ds = hier.zones["example.test."].ds[0].upper()
    assert ds.split()[0] in res.stdout and "RRSIG\tDS" in res.stdout, res.stdout
