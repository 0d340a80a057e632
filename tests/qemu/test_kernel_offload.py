"""The kernel datapath's crypto offload in the daemon, on the router VM: self-test, demote, move.

Why here: only the router VM has kernel ESP, AF_ALG and NETLINK_CRYPTO, and only a real
kernel driver that breaks ESP shows that the daemon's answer works. One daemon runs for the
module (the shipped config with a 2 s canary; ``oe reload`` turns offload_demote on):

1. at start the daemon's ESP offer holds only transforms whose end-to-end self-test passed
   (an XFRM SA pair between two throw-away namespaces on the router), and `oe offload
   --json` shows the verdict per transform; the start cost is read from the daemon;
2. esp_faulty.ko (data/esp_faulty.c, TEST ONLY: an rfc4106(gcm(aes)) driver that flips a
   ciphertext bit when told to) is made the kernel's pick through crypto_user; the daemon
   self-tests GCM on it again (it is still correct) and a Child SA to libreswan's NULL-auth
   OE host (oe-null) is built on it; then the driver goes bad: the canary's KAT of the
   kernel's pick fails, GCM leaves the offer, the live Child SA is rekeyed onto a transform
   still offered (libreswan refuses a rekey that changes the algorithms: then a new Child
   SA replaces it), and traffic flows again with no cleartext on the WAN;
3. with offload_demote on, the daemon lowers the faulty driver below the next
   implementation, the KAT and the self-test pass on the kernel's new pick, and GCM is
   offered again: a new Child SA with oe-null is GCM on rfc4106-gcm-aesni, the fault
   still on.

The lab is left as found: the daemon stopped, the module unloaded (which drops its
priority), crypto_user unloaded if it was not loaded.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-kernel-offload.json"
#: the default offer (config/schema.py DEFAULT_ESP_PROPOSALS): HMAC-SHA2-384/512 included
TRANSFORMS = ("aes256gcm16", "aes128gcm16", "chacha20poly1305", "aes256-sha256", "aes128-sha256",
              "aes256-sha512", "aes256-sha384", "aes128-sha512", "aes128-sha384")  # fmt: skip
GCM = ("aes256gcm16", "aes128gcm16")
FAULTY = "rfc4106-gcm-aes-faulty"
AESNI = "rfc4106-gcm-aesni"
PARAMS = "/sys/module/esp_faulty/parameters"
WAN4 = "203.0.113.2"
CANARY = "2s"


# --- helpers ----------------------------------------------------------------------------------
def offload(lab: Lab) -> dict[str, Any]:
    doc = json.loads(oelab.oe(lab, "offload --json").check().stdout)
    assert isinstance(doc, dict)
    return doc


def wait_for(
    lab: Lab, what: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> dict[str, Any]:
    """Poll `oe offload --json` until ``ok``; fail with the last document's self-test part."""
    deadline = time.monotonic() + timeout
    while True:
        doc = offload(lab)
        if ok(doc):
            return doc
        if time.monotonic() > deadline:
            part = {k: doc.get(k) for k in ("kernel_selftest", "kernel_failed", "kernel_drivers")}
            pytest.fail(f"{what}: not within {timeout:g}s:\n{json.dumps(part, indent=1)}")
        time.sleep(1.0)


def selftest(doc: dict[str, Any]) -> dict[str, Any]:
    part = doc.get("kernel_selftest")
    assert isinstance(part, dict), f"`oe offload --json` has no kernel_selftest: {sorted(doc)}"
    return part


def passed_on(doc: dict[str, Any], transform: str) -> str | None:
    """The driver ``transform``'s current self-test passed on (None: not passed, or stale)."""
    t = selftest(doc)["transforms"].get(transform, {})
    r = t.get("result") or {}
    return r.get("driver") if t.get("state") == "passed" and not t.get("stale") else None


def options(*, demote: bool) -> dict[str, str]:
    return {"global.offload_canary": CANARY, "global.offload_demote": "1" if demote else "0"}


def crypto_user(lab: Lab, code: str) -> Any:
    """Run ``code`` (``C`` is oe_router.offload.crypto_user) on the router; its JSON out."""
    script = f"import json\nfrom oe_router.offload import crypto_user as C\n{code}\n"
    (lab.run_dir / "crypto_user_op.py").write_text(script)
    out = lab.router("python3 /lab/crypto_user_op.py").check().stdout
    return json.loads(out.strip().splitlines()[-1])


def child_sas(lab: Lab, peer: str) -> list[dict[str, Any]]:
    doc = oelab.status(lab)
    rows = [t for t in doc["tunnels"] if t.get("source") == "ike" and t["peer"] == peer]
    return [c for t in rows if t["state"] == "established" for c in t.get("children", [])]


def oe_row(lab: Lab, peer: str) -> dict[str, Any]:
    """The OE manager's row of the Child SA with ``peer`` (engine, state)."""
    rows = [t for t in oelab.status(lab)["tunnels"] if t.get("source") != "ike"]
    (row,) = [t for t in rows if t["peer"] == peer and t["state"] == "established"]
    return row


def proto_errors(lab: Lab, netns: str) -> int:
    """XfrmInStateProtoError of a host's netns: ESP packets whose ICV did not verify."""
    stat = lab.host(netns, "cat /proc/net/xfrm_stat").check().stdout
    m = re.search(r"XfrmInStateProtoError\s+(\d+)", stat)
    assert m, stat
    return int(m.group(1))


def faulted(lab: Lab) -> int:
    return int(lab.router(f"cat {PARAMS}/faulted").check().stdout)


def ping(lab: Lab, addr: str, count: int) -> int:
    """Replies the LAN client got to ``count`` pings (0.3 s apart)."""
    res = lab.client(f"ping -n -c {count} -i 0.3 -W 2 {addr}", timeout=60)
    m = re.search(r"(\d+) received", res.stdout)
    return int(m.group(1)) if m else 0


# --- the module's daemon -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(lab: Lab, crypto_user_module: None, esp_faulty_ko: Path) -> Iterator[dict[str, Any]]:
    """esp_faulty.ko loaded (priority 1, correct: nobody's pick), oe-routerd started; the
    documents `oe offload --json` gave while the first self-test round ran."""
    lab.router("insmod /lab/esp_faulty.ko").check()
    log_start = len(oelab.daemon_log(lab))
    try:
        oelab.start_daemon(lab, options=options(demote=False))
        docs = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            doc = offload(lab)
            docs.append(doc)
            part = selftest(doc)
            if not part["busy"] and part["first_round_s"] is not None:
                break
            time.sleep(0.3)
        yield {"docs": docs, "log_start": log_start}
    finally:
        oelab.stop_daemon(lab)
        lab.router(f"echo 0 > {PARAMS}/fault")
        # SAs free their transforms from a work queue: the module may be busy a moment
        lab.router(
            "for i in $(seq 50); do rmmod esp_faulty 2>/dev/null && exit 0; sleep 0.1; done; "
            "rmmod esp_faulty"
        ).check()


# --- tests ----------------------------------------------------------------------------------------
def test_the_offer_holds_only_self_tested_transforms(
    lab: Lab, daemon: dict[str, Any], figures: dict[str, Any]
) -> None:
    docs = daemon["docs"]
    for doc in docs:  # every look during start-up: offered => its self-test passed
        part = selftest(doc)
        for t in part["offer"]:
            assert passed_on(doc, t), f"{t} offered without a passed self-test: {part}"
    part = selftest(docs[-1])
    assert not part["busy"], part
    assert sorted(part["offer"]) == sorted(TRANSFORMS), part
    results = {t: v["result"] for t, v in part["transforms"].items()}
    for t in TRANSFORMS:
        r = results[t]
        assert r["passed"] and (r["sent"], r["received"], r["corrupted"]) == (48, 48, 0), r
        assert "tunnel: 12+12 datagrams intact" in r["detail"], r
    assert results["aes256gcm16"]["driver"] == AESNI  # esp_faulty.ko is loaded, not picked
    # the daemon's log: an offer never names a transform before its self-test passed
    log = oelab.daemon_log(lab)[daemon["log_start"] :]
    passed: set[str] = set()
    offers = []
    for line in log.splitlines():
        m = re.search(r"ESP self-test (\S+) on \S+: passed", line)
        if m:
            passed.add(m.group(1))
        m = re.search(r"ESP offer: (.*)$", line)
        if m:
            offered = [x.strip() for x in m.group(1).split(",") if x.strip()]
            assert set(offered) <= passed, f"offered {offered} with only {passed} passed"
            offers.append(offered)
    assert offers and len(offers[0]) == 1, offers  # the first transform alone, at once
    # `oe status` shows the self-test as a row of its engines table
    row = next(e for e in oelab.status(lab)["engines"] if e["name"] == "kernel-esp")
    assert {t["transform"]: t["kat"] for t in row["transforms"]} == dict.fromkeys(
        TRANSFORMS, "passed"
    )
    assert row == part["row"]
    text = oelab.oe(lab, "status").check().stdout
    n = len(TRANSFORMS)
    assert re.search(rf"kernel-esp\s.*{n}/{n} passed", text), text
    figures["start"] = {
        "first_offer_s": part["first_offer_s"],
        "first_round_s": part["first_round_s"],
        "first_offer": offers[0],
        "looks": len(docs),
        "per_transform": {
            t: {"s": results[t]["seconds"], "at_s": v["at_s"], "driver": results[t]["driver"]}
            for t, v in part["transforms"].items()
        },
    }


def test_a_failing_kernel_driver_is_withdrawn_and_live_child_sas_move(
    lab: Lab, daemon: dict[str, Any], figures: dict[str, Any]
) -> None:
    peer = lab.plan.host("oe-null").ipv4
    assert "oe-null" not in lab.failed_hosts, lab.failed_hosts
    raised = crypto_user(
        lab,
        f"with C.CryptoUser() as cu:\n"
        f"    best = cu.implementations('rfc4106(gcm(aes))')[0]\n"
        f"    now = cu.set_priority({FAULTY!r}, best.priority + 100)\n"
        f"    print(json.dumps([best.driver, best.priority, now.priority]))",
    )
    assert raised[0] == AESNI and raised[2] == raised[1] + 100, raised
    # the kernel's pick moved (a hotplug change for the offload layer): KAT and self-test
    # run again on the new pick; it is still correct, so GCM stays offered, on it
    t0 = time.monotonic()
    wait_for(
        lab,
        "GCM self-tested again on the faulty driver",
        lambda d: all(passed_on(d, t) == FAULTY for t in GCM)
        and all(t in selftest(d)["offer"] for t in GCM),
    )
    retest_s = time.monotonic() - t0
    wait_for(  # the offload layer's rescan: AF_ALG's view (the KATs, `oe status`'s engine)
        lab,
        "the offload layer proving the faulty driver",
        lambda d: all(dict(map(tuple, d["kernel_drivers"])).get(t) == FAULTY for t in GCM)  # type: ignore[arg-type]
        and set(GCM) <= set(d["kernel_usable"]),
    )
    reprove_s = time.monotonic() - t0
    # a Child SA to libreswan on it
    oelab.oe(lab, f"down {peer}")
    up = oelab.oe(lab, f"up {peer} --auth null")
    assert up.rc == 0, up.stdout + up.stderr
    (child,) = child_sas(lab, peer)
    assert child["transform"].startswith("AES_GCM_16"), child
    assert ping(lab, peer, 3) == 3
    tunnel = oe_row(lab, peer)
    assert tunnel["engine"] == f"kernel ({FAULTY})", tunnel
    # the driver goes bad: every encryption gets a flipped bit
    before, dropped = faulted(lab), proto_errors(lab, "oe-null")
    with lab.capture_wan(label="wan-faulty") as wan:
        lab.router(f"echo 1 > {PARAMS}/fault").check()
        t_fault = time.monotonic()
        moved: list[dict[str, Any]] = []
        while time.monotonic() - t_fault < 60:
            lab.client(f"ping -n -c 1 -W 1 {peer}", timeout=30)  # traffic on the broken SA
            moved = [c for c in child_sas(lab, peer) if not c["transform"].startswith("AES_GCM")]
            if moved:
                break
        # when the new Child SA came up, by its own age in `oe status` (the polling above
        # adds a ping and a status round trip per look)
        move_s = time.monotonic() - t_fault
        up_s = (time.monotonic() - moved[0]["established_s"]) - t_fault if moved else move_s
        assert moved, f"the Child SA did not move off GCM: {child_sas(lab, peer)}"
        replies = ping(lab, peer, 10)
    broken = faulted(lab) - before
    dropped = proto_errors(lab, "oe-null") - dropped
    assert dropped > 0, "libreswan never saw a corrupted packet: the SA was not on the driver"
    assert replies == 10, f"{replies}/10 pings after the move"
    assert wan.count(f"icmp and host {peer}") == 0, wan.text(f"icmp and host {peer}")
    assert wan.count(f"esp and host {peer}") >= 20
    (child,) = child_sas(lab, peer)
    assert not child["transform"].startswith("AES_GCM"), child
    ipsec = lab.host("oe-null", f"ipsec whack --ctlsocket {lab.state_dir('oe-null')}/run/pluto.ctl "
                     "--trafficstatus").check().stdout  # fmt: skip
    assert WAN4 in ipsec, ipsec
    # GCM is out of the offer, and `oe offload` says why
    doc = offload(lab)
    t_doc = time.monotonic()  # the report was made before this: an upper bound below
    part = selftest(doc)
    (move,) = [m for m in part["moves"] if m["peer"] == peer]
    assert move["transform"] in GCM, move
    detect_s = (t_doc - part["now_s"] + move["at_s"]) - t_fault  # fault -> withdrawn
    log = oelab.daemon_log(lab)[daemon["log_start"] :]
    assert "rekeying it onto the current ESP offer" in log
    if move["error"] is not None:  # libreswan keeps a rekeyed Child SA on its algorithms
        assert "negotiating a new Child SA to replace it" in log, log[-3000:]
    assert not set(GCM) & set(part["offer"]), part["offer"]
    assert {t for t, _ in doc["kernel_failed"]} >= set(GCM), doc["kernel_failed"]
    why = part["transforms"]["aes256gcm16"]["why_not"]
    assert f"the kernel's pick {FAULTY} failed its known-answer test" in why, why
    assert "offload_demote is off" in why, why
    afalg = next(e for e in doc["engines"] if e["name"] == "afalg")
    gcm_row = next(t for t in afalg["transforms"] if t["transform"] == "aes256gcm16")
    assert gcm_row["kat"] == "failed" and gcm_row["reason"].startswith("canary:"), gcm_row
    figures["faulty"] = {
        "raised": raised,
        "retest_s": round(retest_s, 1),
        "reprove_s": round(reprove_s, 1),
        "move_s": round(move_s, 1),
        "moved_sa_up_after_s": round(up_s, 1),
        "withdrawn_within_s": round(detect_s, 1),
        "rekey_s": move["took_s"],
        "rekey_refused": move["error"],
        "moved_to": child["transform"],
        "faulted": broken,
        "peer_dropped": dropped,
        "pings_after": replies,
        "canary": CANARY,
    }


def test_offload_demote_lowers_the_faulty_driver_and_gcm_returns(
    lab: Lab, daemon: dict[str, Any], figures: dict[str, Any]
) -> None:
    peer = lab.plan.host("oe-null").ipv4
    assert lab.router(f"cat {PARAMS}/fault").check().stdout.strip() == "1"
    t0 = time.monotonic()
    oelab.reload_daemon(lab, options=options(demote=True))
    doc = wait_for(
        lab,
        "GCM offered again after the demotion",
        lambda d: all(t in selftest(d)["offer"] for t in GCM),
    )
    back_s = time.monotonic() - t0
    part = selftest(doc)
    for t in GCM:
        assert passed_on(doc, t) == AESNI, part["transforms"][t]
    (demotion,) = part["demotions"]
    assert demotion["driver"] == FAULTY and "error" not in demotion, demotion
    now = crypto_user(
        lab,
        f"with C.CryptoUser() as cu:\n"
        f"    print(json.dumps([cu.get_alg({FAULTY!r}).priority, cu.get_alg({AESNI!r}).priority,"
        f" cu.implementations('rfc4106(gcm(aes))')[0].driver]))",
    )
    assert now == [demotion["priority_after"], now[1], AESNI] and now[0] == now[1] - 1, now
    log = oelab.daemon_log(lab)[daemon["log_start"] :]
    assert f"offload_demote: the kernel's pick {FAULTY} failed" in log
    # a new Child SA is GCM again, on the kernel's new pick; the faulty driver is still bad
    oelab.oe(lab, f"down {peer}")
    before = faulted(lab)
    with lab.capture_wan(label="wan-demoted") as wan:
        up = oelab.oe(lab, f"up {peer} --auth null")
        assert up.rc == 0, up.stdout + up.stderr
        replies = ping(lab, peer, 10)
    (child,) = child_sas(lab, peer)
    assert child["transform"].startswith("AES_GCM_16"), child
    assert replies == 10
    assert faulted(lab) == before  # nothing ran on it
    assert wan.count(f"icmp and host {peer}") == 0
    tunnel = oe_row(lab, peer)
    assert tunnel["engine"] == f"kernel ({AESNI})", tunnel
    oelab.oe(lab, f"down {peer}")
    figures["demote"] = {"back_s": round(back_s, 1), "demotion": demotion, "esp": child}
