"""The crypto engines through the daemon in the router VM: found, proven, measured, chosen, and
replaced by software when the device goes away.

Why in QEMU: the router's virtio-crypto device is the lab's hardware engine
(``virtio_crypto_aes_cbc``, cbc(aes) at priority 150; AES-NI's 400 outranks it for the
kernel's own pick). Under TCG it is several times slower than the CPU, which is the case
"measure, don't assume" exists for: the daemon must find it as hardware, prove it, measure
it, and still give it no traffic in ``offload auto``.

One daemon (kernel datapath, the shipped configuration, canary off) for the module:

* ``oe offload bench`` measures every proven engine (the kernel datapath measures only
  the kernel's pick in the background); the virtio engine's Mbit/s at 64, 512 and 1400
  bytes are below every CPU engine's for both CBC transforms, and no band of the ``auto``
  table names it;
* with ``offload virtio_crypto_aes_cbc`` (the user asks for it) the CBC transforms run on
  it; unbinding the virtio PCI device from its driver unregisters the driver's
  algorithms, the hotplug rescan notices, the engine leaves ``oe offload`` and the table
  gives the CBC transforms to software with a note saying why; binding it again brings the
  engine back, proven anew, and the table returns the CBC transforms to it.

The canary is off here on purpose: no engine work may hold a virtio transform while the
device is unbound (the kernel's crypto_unregister_alg expects no user left).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-offload-lab.json"
DRIVER = "virtio_crypto_aes_cbc"
VIRTIO = f"afalg:{DRIVER}"
#: AES-CBC with HMAC-SHA2-256/384/512 (RFC 4868): a cbc(aes) driver runs all six
CBC = tuple(f"aes{b}-sha{h}" for h in (256, 384, 512) for b in (128, 256))
SIZES = (64, 512, 1400)
OPTIONS = {"global.offload_canary": "0s"}
RESCAN = 10.0  # OffloadService's rescan interval (no pyudev in the image: "hotplug rescan")


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[Lab]:
    """oe-routerd with the shipped configuration (kernel datapath, offload auto), canary off."""
    oelab.start_daemon(lab, options=OPTIONS)
    try:
        yield lab
    finally:
        oelab.stop_daemon(lab)


def engine(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in doc["engines"] if e["name"] == name), None)


def rows(e: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["transform"]: t for t in e["transforms"]}


def rates(row: dict[str, Any]) -> dict[int, float]:
    return {int(r["size"]): float(r["mbit_s"]) for r in row["rates"]}


def bands(doc: dict[str, Any], transform: str) -> list[tuple[str, int | None]]:
    return [(b["engine"], b["max_size"]) for b in doc["table"]["transforms"][transform]["bands"]]


def virtio_proven(doc: dict[str, Any]) -> bool:
    e = engine(doc, VIRTIO)
    return e is not None and all(rows(e).get(t, {}).get("kat") == "passed" for t in CBC)


def test_virtio_is_hardware_proven_measured_and_loses_to_the_cpu(
    daemon: Lab, figures: dict[str, Any]
) -> None:
    """virtio-crypto is found as a hardware engine, passes its KATs for the six CBC
    transforms, is measured by `oe offload bench`, is slower than every CPU engine at every
    size under TCG, and the auto table gives it no band."""
    lab = daemon
    oelab.wait_until(
        "the virtio engine proven by the daemon",
        lambda: virtio_proven(oelab.offload_report(lab)),
        timeout=240,
        pause=2,
    )
    doc = oelab.offload_report(lab, bench=True)
    figures["engine table (auto, after bench)"] = oelab.offload_rows(doc)
    figures["table"] = doc["table"]
    print("\n" + oelab.oe(lab, "offload").check().stdout)

    v = engine(doc, VIRTIO)
    assert v is not None, [e["name"] for e in doc["engines"]]
    assert v["hardware"] is True and v["kind"] == "hardware", v
    assert v["proven"] and v["state"] == "ready", v
    vr = rows(v)
    for t in CBC:
        assert vr[t]["kat"] == "passed", vr[t]
        assert vr[t]["driver"].startswith(f"authenc(hmac({t.split('-')[1]}"), vr[t]
        assert vr[t]["driver"].endswith(f",{DRIVER})"), vr[t]
        assert sorted(rates(vr[t])) == list(SIZES), vr[t]
        assert all(m > 0 for m in rates(vr[t]).values()), vr[t]
    assert set(vr) == set(CBC), vr  # a cbc(aes) driver: the CBC transforms, nothing else

    cpu = [e for e in doc["engines"] if not e["hardware"]]
    assert {"software", "afalg"} <= {e["name"] for e in cpu}, [e["name"] for e in cpu]
    slower: dict[str, Any] = {}
    for t in CBC:
        mine = rates(vr[t])
        for e in cpu:
            theirs = rates(rows(e)[t])
            assert sorted(theirs) == list(SIZES), (e["name"], rows(e)[t])
            for s in SIZES:
                assert mine[s] < theirs[s], (
                    f"{VIRTIO} {t}@{s}: {mine[s]} Mbit/s, not below {e['name']}'s {theirs[s]}"
                )
                slower[f"{t}@{s} {e['name']}"] = round(theirs[s] / mine[s], 1)
    figures["cpu / virtio speed ratio"] = slower

    assert doc["offload"] == "auto" and doc["table"]["offload"] == "auto"
    for t, choice in doc["table"]["transforms"].items():
        assert choice["bands"], f"{t}: no engine in the auto table"
        assert all(b["engine"] != VIRTIO for b in choice["bands"]), (t, choice)
    for t in CBC:
        verified = doc["table"]["transforms"][t]["verified"]
        assert VIRTIO in verified and verified[-1] == VIRTIO, verified  # proven, slowest
        assert vr[t]["in_use_for"] == "", vr[t]
    assert v["selected"] is False and v["in_use_for"] == [], v


def test_without_the_device_software_takes_over(daemon: Lab, figures: dict[str, Any]) -> None:
    """`offload virtio_crypto_aes_cbc`: the CBC transforms run on virtio. The device is
    unbound from virtio-pci: the engine leaves `oe offload` within the rescan interval and
    the table moves the CBC transforms to software, saying why. Bound again: the engine
    comes back, proven anew, and gets the CBC transforms back."""
    lab = daemon
    oelab.reload_daemon(lab, options={**OPTIONS, "global.offload": DRIVER})
    doc = oelab.wait_until(
        "offload virtio_crypto_aes_cbc giving the CBC transforms to virtio",
        lambda: (
            d
            if all(bands(d := oelab.offload_report(lab), t) == [(VIRTIO, None)] for t in CBC)
            else None
        ),
        timeout=120,
        pause=1,
    )
    assert bands(doc, "aes256gcm16") == [("software", None)], doc["table"]
    name, pci = oelab.virtio_crypto_device(lab)
    figures["device"] = {"virtio": name, "pci": pci}
    unbound = False
    try:
        gone = oelab.act_and_watch(
            lab,
            f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/unbind",
            {"gone": f"engine {VIRTIO} is gone"},
            limit=RESCAN + 20,
        )
        unbound = gone["action_rc"] == 0
        assert unbound, gone
        crypto = lab.router("cat /proc/crypto").check().stdout
        assert DRIVER not in crypto, "the driver's algorithms are still registered"
        assert "gone" in gone["seen"], f"the daemon did not notice: {gone}"
        t_gone = gone["seen"]["gone"][0]
        figures["unbind"] = {"unbind_s": gone["action_s"], "engine_gone_after_s": t_gone}
        assert t_gone <= RESCAN + 5, gone

        doc = oelab.offload_report(lab)
        assert engine(doc, VIRTIO) is None, [e["name"] for e in doc["engines"]]
        for t in CBC:
            assert bands(doc, t) == [("software", None)], doc["table"]["transforms"][t]
        notes = doc["table"]["notes"]
        assert any(f"offload {DRIVER}: no such engine here" in n for n in notes), notes
        assert any(f"{VIRTIO} is gone" in ev for ev in doc["events"]), doc["events"]
        figures["after unbind"] = {"table": doc["table"], "events": doc["events"]}
        print("\n" + oelab.oe(lab, "offload").check().stdout)

        back = oelab.act_and_watch(
            lab,
            f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/bind",
            {"choice": f"aes256-sha256: {VIRTIO}"},
            limit=RESCAN + 90,
        )
        unbound = back["action_rc"] != 0
        assert not unbound, back
        assert "choice" in back["seen"], f"virtio did not come back into the table: {back}"
        figures["rebind"] = {
            "bind_s": back["action_s"],
            "in_table_after_s": back["seen"]["choice"][0],
        }
    finally:
        if unbound:
            lab.router(f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/bind")
    doc = oelab.offload_report(lab)
    assert virtio_proven(doc), engine(doc, VIRTIO)
    for t in CBC:
        assert bands(doc, t) == [(VIRTIO, None)], doc["table"]["transforms"][t]
    assert oelab.virtio_crypto_device(lab)[1] == pci  # the lab as it was found
    entry = lab.router(f"grep -A 8 'driver.*: {DRIVER}$' /proc/crypto").check().stdout
    assert "selftest     : passed" in entry, entry
    print(f"\n{json.dumps({k: figures[k] for k in ('unbind', 'rebind')})}")
