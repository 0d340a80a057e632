"""The kernel datapath's end-to-end ESP self-test and NETLINK_CRYPTO, on the router VM.

Why here: the host kernel has no ESP and no AF_ALG; the router VM (Debian 6.1, `-cpu max`,
virtio-crypto) has both. Each test runs a small guest script (GUEST below, written to the
lab's 9p share) against the oe_router installed in the image, and checks what it reports:

- every transform passes on the router, with its time (the budget is about 1 s each);
- the control case (one side's key wrong) fails with a detail that says why;
- a timed-out and a cancelled self-test end quickly and hold no namespace;
- crypto_user: virtio_crypto_aes_cbc raised above cbc-aes-aesni takes a new AF_ALG bind of
  cbc(aes) and carries real ESP through XFRM; restored, the lab is as it was;
- a real driver that breaks ESP is caught: data/esp_faulty.c is a test-only kernel module, a
  rfc4106(gcm(aes)) driver that wraps the kernel's own and, when told to, flips a
  ciphertext bit or fails encryption with -EIO. It passes the kernel's self-test when it
  registers (as SafeXcel's GCM did, openwrt/openwrt#21310), crypto_user makes it the
  kernel's pick, the ESP self-test must fail on it, and lower_priority must move the pick
  back to a driver that passes.

Every test compares the router's namespaces, XFRM state and policies, links and routes
before and after: the self-test must leave nothing behind.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-kernel-esp-selftest.json"
#: offload/engine.py's TRANSFORMS, in its order (AES-CBC with HMAC-SHA2-256/384/512)
TRANSFORMS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256", "aes256-sha256",
              "aes128-sha384", "aes256-sha384", "aes128-sha512", "aes256-sha512")  # fmt: skip
VIRTIO = "virtio_crypto_aes_cbc"
AESNI_CBC = "cbc-aes-aesni"
FAULTY = "rfc4106-gcm-aes-faulty"
BUDGET_S = 2.0  # per transform and both variants, under TCG (measured 0.35-0.7 s warm)

GUEST = r'''
"""Runs INSIDE the router VM: one operation of the ESP self-test / crypto_user, JSON out."""
import asyncio, dataclasses, json, os, socket, sys, time

from oe_router.datapath import selftest as S
from oe_router.offload import crypto_user as C
from oe_router.offload.procfs import read_proc_crypto


def res(r):
    return dataclasses.asdict(r)


def wrong_key(plan, field):
    keys = plan.spec_b.inbound
    bad = dataclasses.replace(keys, **{field: bytes(len(getattr(keys, field)))})
    return dataclasses.replace(plan, spec_b=dataclasses.replace(plan.spec_b, inbound=bad))


def held_netns():
    """Network namespaces this process still holds by descriptor (its own excepted)."""
    own = os.readlink("/proc/self/ns/net")
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("net:") and link != own:
            out.append(link)
    return out


async def op_all():
    out = {}
    for run in ("cold", "warm"):
        t0 = time.monotonic()
        results = await S.esp_selftest_all()
        out[run] = {"total": time.monotonic() - t0,
                    "results": {k: res(v) for k, v in results.items()}}
    return out


async def op_control():
    out = {}
    for transform, field in (("aes256-sha256", "integ_key"), ("aes128gcm16", "encr_key")):
        plans = [wrong_key(S.plan_selftest(transform, variant=v), field)
                 for v in S.DEFAULT_VARIANTS]
        [r] = await S.run_selftest(plans)
        out[transform] = res(r)
    return out


async def op_stop():
    t0 = time.monotonic()
    timed_out = await S.esp_selftest("aes128gcm16", timeout=0.05)
    t_timeout = time.monotonic() - t0
    task = asyncio.create_task(S.esp_selftest_all())
    await asyncio.sleep(0.3)
    task.cancel()
    t1 = time.monotonic()
    try:
        await task
        cancelled = False
    except asyncio.CancelledError:
        cancelled = True
    return {"timeout": res(timed_out), "t_timeout": t_timeout, "cancelled": cancelled,
            "t_cancel": time.monotonic() - t1, "held": held_netns()}


def bind(name):
    """An AF_ALG skcipher socket bound and keyed: the kernel allocates the transform."""
    s = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    s.bind(("skcipher", name))
    s.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, bytes(16))
    return s


def bound_to(cu, drivers):
    """Which driver a new AF_ALG bind of cbc(aes) takes: the one whose refcnt rises, as
    crypto_user and /proc/crypto both report it."""
    def counts():
        proc = {a.driver: a.refcnt for a in read_proc_crypto()}
        return {d: (cu.get_alg(d).refcnt, proc.get(d)) for d in drivers}
    before = counts()
    s = bind("cbc(aes)")
    during = counts()
    s.close()
    return {d: [during[d][0] - before[d][0], during[d][1] - before[d][1]] for d in drivers}


async def op_crypto_user():
    V, A = sys.argv[2], sys.argv[3]
    out = {}
    with C.CryptoUser() as cu:
        v, a = cu.get_alg(V), cu.get_alg(A)
        out["before"] = {V: v.priority, A: a.priority}
        out["implementations"] = [x.driver for x in cu.implementations("cbc(aes)")]
        out["bind_before"] = bound_to(cu, (V, A))
        try:
            out["raised"] = cu.set_priority(V, a.priority + 1).priority
            out["bind_raised"] = bound_to(cu, (V, A))
            out["esp_raised"] = res(await S.esp_selftest("aes128-sha256"))
        finally:
            out["restored"] = {V: cu.set_priority(V, v.priority).priority,
                               A: cu.get_alg(A).priority}
        out["bind_restored"] = bound_to(cu, (V, A))
        out["esp_restored"] = res(await S.esp_selftest("aes128-sha256"))
    return out


def fault(mode):
    with open("/sys/module/esp_faulty/parameters/fault", "w") as f:
        f.write(f"{mode}\n")


def faulted():
    with open("/sys/module/esp_faulty/parameters/faulted") as f:
        return int(f.read())


async def op_faulty():
    F, GCM = sys.argv[2], "rfc4106(gcm(aes))"
    out = {}
    with C.CryptoUser() as cu:
        f0 = cu.get_alg(F)
        best = cu.implementations(GCM)[0]
        out["registered"] = {"priority": f0.priority, "tested": f0.tested, "best": best.driver}
        try:
            out["idle"] = res(await S.esp_selftest("aes128gcm16"))
            out["raised"] = cu.set_priority(F, best.priority + 100).priority
            out["picked"] = res(await S.esp_selftest("aes128gcm16"))
            for mode in (1, 2):
                fault(mode)
                n = faulted()
                out[f"fault{mode}"] = res(await S.esp_selftest("aes128gcm16"))
                out[f"fault{mode}_faulted"] = faulted() - n
            lowered = cu.lower_priority(F)
            out["lowered"] = {"priority": lowered.priority,
                              "pick": cu.implementations(GCM)[0].driver}
            out["after_lower"] = res(await S.esp_selftest("aes128gcm16"))  # fault still 2
        finally:
            fault(0)
            cu.set_priority(F, f0.priority, repick=False)
    return out


OPS = {"all": op_all, "control": op_control, "stop": op_stop,
       "crypto-user": op_crypto_user, "faulty": op_faulty}
print(json.dumps(asyncio.run(OPS[sys.argv[1]]())))
'''


# --- helpers --------------------------------------------------------------------------------
def guest(lab: Lab, op: str, *args: str, timeout: float = 180) -> Any:
    """Run one GUEST operation on the router; its stdout's last line is JSON."""
    (lab.run_dir / "esp_selftest_guest.py").write_text(GUEST)
    cmd = " ".join(["python3 /lab/esp_selftest_guest.py", op, *map(shlex.quote, args)])
    res = lab.router(cmd, timeout=timeout).check()
    return json.loads(res.stdout.strip().splitlines()[-1])


def snapshot(lab: Lab) -> str:
    """What the self-test must not change: namespaces, XFRM, links, addresses, routes."""
    cmds = ("ip netns list", "ip xfrm state", "ip xfrm policy", "ip -br link", "ip -br addr",
            "ip route show table all", "ip -6 route show table all")  # fmt: skip
    return lab.router("; ".join(f"echo '# {c}'; {c}" for c in cmds)).check().stdout


@pytest.fixture
def untouched(lab: Lab) -> Iterator[None]:
    before = snapshot(lab)
    yield
    assert snapshot(lab) == before


# --- tests ------------------------------------------------------------------------------------
def test_every_transform_passes_on_the_router(
    lab: Lab, untouched: None, figures: dict[str, Any]
) -> None:
    out = guest(lab, "all")
    figures["all"] = {
        run: {"total_s": round(out[run]["total"], 3)}
        | {t: {"s": r["seconds"], "driver": r["driver"]} for t, r in out[run]["results"].items()}
        for run in ("cold", "warm")
    }
    for run in ("cold", "warm"):
        results = out[run]["results"]
        assert tuple(results) == TRANSFORMS
        for t, r in results.items():
            assert r["passed"], f"{run} {t}: {r['detail']}"
            assert (r["sent"], r["received"], r["corrupted"]) == (48, 48, 0), r
            assert "tunnel: 12+12 datagrams intact" in r["detail"]
            assert "transport+udp: 12+12 datagrams intact" in r["detail"]
            assert r["driver"], f"{t}: the kernel's pick was not read"
    warm = out["warm"]["results"]
    assert warm["aes128gcm16"]["driver"] == "rfc4106-gcm-aesni"
    assert "cbc-aes-aesni" in warm["aes256-sha256"]["driver"]
    slow = {t: r["seconds"] for t, r in warm.items() if r["seconds"] > BUDGET_S}
    assert not slow, f"over {BUDGET_S}s per transform: {slow}"


def test_mismatched_keys_are_reported_as_failed(lab: Lab, untouched: None) -> None:
    out = guest(lab, "control")
    for transform, key in (("aes256-sha256", "integrity"), ("aes128gcm16", "encryption")):
        r = out[transform]
        assert not r["passed"], f"{transform} with a wrong {key} key passed"
        assert (r["sent"], r["received"], r["corrupted"]) == (48, 24, 0), r
        for variant in ("tunnel", "transport+udp"):
            assert (
                f"{variant}: A->B: 0 of 12 datagrams arrived; B's inbound SA counted 12 "
                "integrity failures (the ICV did not verify" in r["detail"]
            ), r["detail"]
        assert "B->A" not in r["detail"]  # the other direction's keys were right


def test_timeout_and_cancellation_end_quickly_and_hold_nothing(lab: Lab, untouched: None) -> None:
    out = guest(lab, "stop")
    r = out["timeout"]
    assert not r["passed"] and r["detail"] == (
        "tunnel: timed out after 0.05s; transport+udp: timed out after 0.05s"
    )
    assert out["t_timeout"] < 3.0
    assert out["cancelled"] and out["t_cancel"] < 1.5
    assert out["held"] == []


def test_crypto_user_moves_cbc_aes_to_virtio_and_back(
    lab: Lab, untouched: None, crypto_user_module: None, figures: dict[str, Any]
) -> None:
    out = guest(lab, "crypto-user", VIRTIO, AESNI_CBC)
    figures["crypto-user"] = out
    assert out["before"] == {VIRTIO: 150, AESNI_CBC: 400}
    assert out["implementations"][:2] == [AESNI_CBC, VIRTIO]
    # [crypto_user refcnt delta, /proc/crypto refcnt delta] while a bind is open
    assert out["bind_before"] == {VIRTIO: [0, 0], AESNI_CBC: [1, 1]}
    assert out["raised"] == 401
    assert out["bind_raised"] == {VIRTIO: [1, 1], AESNI_CBC: [0, 0]}
    esp = out["esp_raised"]
    assert esp["passed"], esp["detail"]
    assert esp["driver"] == f"authenc(hmac(sha256-generic),{VIRTIO})"
    assert out["restored"] == {VIRTIO: 150, AESNI_CBC: 400}
    assert out["bind_restored"] == {VIRTIO: [0, 0], AESNI_CBC: [1, 1]}
    esp = out["esp_restored"]
    assert esp["passed"] and esp["driver"] == f"authenc(hmac(sha256-generic),{AESNI_CBC})"


def test_a_faulty_driver_is_caught_and_lowered(
    lab: Lab,
    untouched: None,
    crypto_user_module: None,
    esp_faulty_ko: Path,
    figures: dict[str, Any],
) -> None:
    lab.router("insmod /lab/esp_faulty.ko").check()
    try:
        out = guest(lab, "faulty", FAULTY)
    finally:
        # SAs free their transforms from a work queue, and namespaces die asynchronously:
        # the module may stay in use for a moment after the guest script has exited.
        lab.router(
            "for i in $(seq 50); do rmmod esp_faulty 2>/dev/null && exit 0; sleep 0.1; "
            "done; rmmod esp_faulty"
        ).check()
    figures["faulty"] = out
    reg = out["registered"]
    assert reg == {"priority": 1, "tested": True, "best": "rfc4106-gcm-aesni"}
    assert out["idle"]["passed"] and out["idle"]["driver"] == "rfc4106-gcm-aesni"
    # the faulty driver as the kernel's pick, still correct: the self-test runs on it
    assert out["raised"] == 500
    assert out["picked"]["passed"] and out["picked"]["driver"] == FAULTY, out["picked"]
    f1 = out["fault1"]
    assert not f1["passed"] and f1["driver"] == FAULTY and f1["received"] == 0
    assert "A's inbound SA counted 12 integrity failures" in f1["detail"]
    assert out["fault1_faulted"] >= 48
    f2 = out["fault2"]
    assert not f2["passed"] and f2["received"] == 0
    assert "A->B: the kernel refused 12 of 12 datagrams (EIO: " in f2["detail"]
    assert out["fault2_faulted"] >= 48
    # lower_priority moves the pick off it; the self-test passes again, fault still on
    assert out["lowered"] == {"priority": 399, "pick": "rfc4106-gcm-aesni"}
    after = out["after_lower"]
    assert after["passed"] and after["driver"] == "rfc4106-gcm-aesni", after
    assert lab.router("grep -c esp_faulty /proc/modules").stdout.strip() == "0"
