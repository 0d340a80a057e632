"""The world bundle: layout, world.json, config syntax checked by the real tools,
zone breakage checked offline by dnspython, and oe-sw's charon really started
from the bundle's start.sh (SWROOT=/ : the host's strongSwan stands in for
/opt/swroot) with swanctl.conf loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdatatype
import dns.zone
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.netns import in_ns, netns


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> world.WorldInfo:
    return world.build(tmp_path_factory.mktemp("world") / "bundle", sw_datapath="libipsec")


def test_world_json_describes_every_host(bundle: world.WorldInfo) -> None:
    data = json.loads((bundle.outdir / "world.json").read_text())
    hosts = {h["netns"]: h for h in data["hosts"]}
    assert set(hosts) == {
        "ns", "resolver", "oe-null", "oe-rsa", "oe-sw", "plain", "insecure", "bogus",
        "ls-a", "ls-b", "ls-m", "oe-cat", "oe-iked", "oe-iked-rsa",
    }  # fmt: skip
    assert hosts["oe-rsa"]["expected"] == "protected-rsa"
    assert hosts["bogus"]["expected"] == "servfail"
    assert hosts["ns"]["v4"] == "203.0.113.53"
    for rel in (data["router"]["identity_key"], data["router"]["trust_anchor_ds"]):
        assert (bundle.outdir / rel).is_file()
    for h in hosts:
        assert (bundle.outdir / "hosts" / h / "start.sh").stat().st_mode & 0o111


def test_shell_scripts_parse(bundle: world.WorldInfo) -> None:
    scripts = [*bundle.outdir.glob("hosts/*/*.sh"), bundle.outdir / "lib" / "common.sh"]
    # start.sh + stop.sh per host, ls-m's set-group.sh, the iked hosts' iked.sh, common.sh
    assert len(scripts) == 32
    for script in scripts:
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{script}: {res.stderr}"


def _substituted(src: Path, dst: Path, state: Path) -> Path:
    dst.write_text(src.read_text().replace("@STATE@", str(state)))
    return dst


@pytest.mark.host
def test_unbound_and_knot_configs_pass_their_checkers(
    bundle: world.WorldInfo, tmp_path: Path
) -> None:
    for tool in ("unbound-checkconf", "knotc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install $(cat scripts/apt-packages.txt)")
    conf = _substituted(
        bundle.outdir / "hosts/resolver/unbound.conf", tmp_path / "unbound.conf", tmp_path
    )
    (tmp_path / "root.hints").write_text((bundle.outdir / "hosts/resolver/root.hints").read_text())
    res = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.copytree(bundle.outdir / "hosts/ns/zones", tmp_path / "zones")
    kconf = _substituted(bundle.outdir / "hosts/ns/knot.conf", tmp_path / "knot.conf", tmp_path)
    res = subprocess.run(["knotc", "-c", str(kconf), "conf-check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _zone(bundle: world.WorldInfo, origin: str) -> dns.zone.Zone:
    return dns.zone.from_file(
        str(bundle.outdir / bundle.zones[origin]), origin=origin, relativize=False
    )


def _check(zone: dns.zone.Zone, owner: str, rdtype: str, keys_zone: dns.zone.Zone) -> None:
    name = dns.name.from_text(owner)
    rrset = zone.find_rrset(name, rdtype)
    sigs = zone.find_rrset(name, dns.rdatatype.RRSIG, dns.rdatatype.from_text(rdtype))
    keyname = keys_zone.origin
    assert keyname is not None
    keys = {keyname: keys_zone.find_rdataset(keyname, "DNSKEY")}
    dns.dnssec.validate(rrset, sigs, keys)


def test_zone_signatures_offline(bundle: world.WorldInfo) -> None:
    """dnspython's verifier agrees: good RRsets verify, broken ones do not."""
    example = _zone(bundle, "example.test.")
    for owner, t in (("rsa.example.test.", "IPSECKEY"), ("example.test.", "DNSKEY")):
        _check(example, owner, t, example)
    bogus = _zone(bundle, "bogus.test.")
    _check(bogus, "bogus.test.", "SOA", bogus)  # apex untouched
    with pytest.raises(dns.dnssec.ValidationFailure):
        _check(bogus, "www.bogus.test.", "A", bogus)
    expired = _zone(bundle, "expired.test.")
    with pytest.raises(dns.dnssec.ValidationFailure):
        _check(expired, "www.expired.test.", "IPSECKEY", expired)
    other = _zone(bundle, "otherkey.test.")
    sig = other.find_rdataset("www.otherkey.test.", "RRSIG", "A")[0]
    assert sig.signer == dns.name.from_text("example.test.")
    test_zone = _zone(bundle, "test.")
    child = _zone(bundle, "dsmismatch.test.")
    ds = test_zone.find_rdataset("dsmismatch.test.", "DS")[0]
    dnskey = child.find_rdataset("dsmismatch.test.", "DNSKEY")[0]
    assert dns.dnssec.make_ds("dsmismatch.test.", dnskey, "SHA256") != ds
    ds_ok = test_zone.find_rdataset("example.test.", "DS")[0]
    key_ok = example.find_rdataset("example.test.", "DNSKEY")[0]
    assert dns.dnssec.make_ds("example.test.", key_ok, "SHA256") == ds_ok
    assert "NSEC3PARAM" in (bundle.outdir / bundle.zones["nsec3.test."]).read_text()


@pytest.mark.host
def test_oe_sw_start_sh_runs_charon_and_loads_conns(
    bundle: world.WorldInfo, tmp_path: Path
) -> None:
    """The real start.sh starts charon (host strongSwan, SWROOT=/) in a netns and
    swanctl.conf loads: the oe-router conn with both FQDN ids and public keys."""
    if not Path("/usr/lib/ipsec/charon").exists() or shutil.which("swanctl") is None:
        pytest.fail("strongSwan missing: apt-get install $(cat scripts/apt-packages.txt)")
    sw = bundle.host("oe-sw")
    env = {"LAB_STATE": str(tmp_path / "state"), "SWROOT": "/"}
    with netns("sw", [sw.v4]) as ns:
        start = in_ns(ns, ["sh", str(bundle.outdir / "hosts/oe-sw/start.sh")], env, timeout=60)
        try:
            assert start.returncode == 0, start.stderr
            vici = f"unix://{tmp_path}/state/oe-sw/charon.vici"
            conns = in_ns(ns, ["swanctl", "--list-conns", "--uri", vici])
            assert "oe-router:" in conns.stdout, conns.stdout + conns.stderr
            assert "sw.example.test" in conns.stdout and "router.example.test" in conns.stdout
            load_log = (tmp_path / "state/oe-sw/swanctl-load.log").read_text()
            assert "loaded ECDSA key" in load_log, load_log
            page = in_ns(
                ns,
                [
                    "python3",
                    "-c",
                    "import urllib.request as u;"
                    f"print(u.urlopen('http://{sw.v4}/host.txt', timeout=5).read().decode())",
                ],
            )
            assert page.stdout.strip() == "oe-sw", page.stdout + page.stderr
        finally:
            in_ns(ns, ["sh", str(bundle.outdir / "hosts/oe-sw/stop.sh")], env)


def _router_charon_files(bundle: world.WorldInfo, d: Path) -> None:
    """A stand-in initiator with the ROUTER's identity: the sw peer's public key is
    taken from its IPSECKEY record in the signed zone, as the router would."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from labkit import peers

    example = _zone(bundle, "example.test.")
    rec = example.find_rdataset("sw.example.test.", "IPSECKEY")[0]
    assert rec.algorithm == 3 and rec.gateway_type == 0
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + rec.key)
    (d / "swanctl/private").mkdir(parents=True)
    (d / "swanctl/pubkey").mkdir(parents=True)
    (d / "swanctl/private/router.key").write_bytes(
        (bundle.outdir / bundle.router.identity_key).read_bytes()
    )
    (d / "swanctl/pubkey/router.pub").write_bytes(
        (bundle.outdir / bundle.router.identity_pub).read_bytes()
    )
    (d / "swanctl/pubkey/sw.pub").write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (d / "strongswan.conf").write_text(
        peers.render_strongswan_conf("libipsec").replace("@STATE@", str(d))
    )
    conf = peers.render_swanctl_conf(
        bundle.router.wan_v4, "router.example.test", "sw.example.test", "router.pub", "sw.pub"
    )
    conf = conf.replace("remote_addrs = %any", f"remote_addrs = {bundle.host('oe-sw').v4}")
    (d / "swanctl/swanctl.conf").write_text(conf)


@pytest.mark.host
def test_router_identity_authenticates_to_oe_sw(bundle: world.WorldInfo, tmp_path: Path) -> None:
    """IKE end to end on the host (userspace ESP): a charon holding the router's
    identity key initiates to oe-sw started by its start.sh; both sides
    authenticate by public key (RFC 7427) with FQDN ids and the Child SA installs."""
    sw = bundle.host("oe-sw")
    rt = bundle.router.wan_v4
    env = {"LAB_STATE": str(tmp_path / "state"), "SWROOT": "/"}
    rdir = tmp_path / "router"
    _router_charon_files(bundle, rdir)
    with netns("sw2", []) as ns_sw, netns("rt", []) as ns_rt:
        subprocess.run(
            ["ip", "-n", ns_sw, "link", "add", "v0", "type", "veth", "peer", "v1", "netns", ns_rt],
            check=True,
        )
        for ns, dev, addr in ((ns_sw, "v0", sw.v4), (ns_rt, "v1", rt)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        start = in_ns(ns_sw, ["sh", str(bundle.outdir / "hosts/oe-sw/start.sh")], env, timeout=60)
        router = None
        try:
            assert start.returncode == 0, start.stderr
            router = subprocess.Popen(
                ["ip", "netns", "exec", ns_rt, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", "mount -t tmpfs tmpfs /run && exec /usr/lib/ipsec/charon"],
                env={"STRONGSWAN_CONF": str(rdir / "strongswan.conf"), "PATH": "/usr/bin:/bin"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            vici = f"unix://{rdir}/charon.vici"
            for _ in range(100):
                if (rdir / "charon.vici").exists():
                    break
                subprocess.run(["sleep", "0.1"], check=True)
            load = in_ns(
                ns_rt,
                ["swanctl", "--load-all", "--file", str(rdir / "swanctl/swanctl.conf"),
                 "--uri", vici],
            )  # fmt: skip
            assert load.returncode == 0, load.stdout + load.stderr
            init = in_ns(
                ns_rt, ["swanctl", "--initiate", "--child", "oe", "--uri", vici, "--timeout", "20"]
            )
            sas = in_ns(ns_rt, ["swanctl", "--list-sas", "--uri", vici]).stdout
            assert init.returncode == 0, init.stdout + (rdir / "charon.log").read_text()[-3000:]
            assert "ESTABLISHED" in sas and "INSTALLED" in sas, sas
            assert "sw.example.test" in sas and "router.example.test" in sas, sas
        finally:
            if router is not None:
                subprocess.run(["kill", str(router.pid)], check=False)
                router.wait(timeout=10)
            in_ns(ns_sw, ["sh", str(bundle.outdir / "hosts/oe-sw/stop.sh")], env)
