"""The `make demo` report (qemu/demo_report.py) on recorded inputs.

lab_kernel_xfrm.json is what qemu/demo.py recorded in the QEMU lab (the final `oe status
--json` taken after the scenario, `oe offload --json`, the wire counts, the DNS answers);
first_moment.json pairs the same kind of wire evidence with the first status document a
daemon answers (before any service reported), the one the old demo judged from;
engines.json is a userspace-datapath status with the engines table and tunnel engines.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from demo_report import (
    DemoInputs,
    Visit,
    judge,
    kernel_sa_algorithms,
    not_ready,
    parse_dig,
    report,
)
from oe_router.control import Status

DATA = Path(__file__).parent / "data" / "demo"


def _doc(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / name).read_text()))


def _missing(text: str) -> list[str]:
    """The lines of the report's "Missing or not working" section."""
    section = text.split("Missing or not working", 1)[1].split("\n\n", 1)[0]
    return [ln.strip().removeprefix("- ") for ln in section.splitlines()[1:]]


def _row(text: str, name: str) -> str:
    rows = [ln for ln in text.splitlines() if ln.strip().startswith(name + " ")]
    assert len(rows) == 1, rows
    return rows[0]


def _block(text: str, name: str) -> list[str]:
    """A destination's row and its indented detail lines."""
    lines = text.splitlines()
    i = lines.index(_row(text, name))
    out = [lines[i]]
    for ln in lines[i + 1 :]:
        if not ln.startswith("    "):
            break
        out.append(ln.strip())
    return out


# ------------------------------------------------------------------ (a) the QEMU lab's record
@pytest.fixture(scope="module")
def lab() -> DemoInputs:
    return DemoInputs.from_json(_doc("lab_kernel_xfrm.json"))


def test_lab_record_is_a_final_status_after_the_scenario(lab: DemoInputs) -> None:
    """The recording itself: a ready status with established tunnels, not a first moment."""
    assert lab.status is not None
    status = Status.from_json(lab.status)
    assert not_ready(status) == ""
    assert status.daemon.datapath.startswith("kernel-xfrm")
    assert any(t.state == "established" for t in status.tunnels)


def test_lab_report_shows_kernel_xfrm_datapath(lab: DemoInputs) -> None:
    text = report(lab)
    assert "datapath  kernel-xfrm (kernel has ESP (esp4) and XFRM netlink)" in text
    assert "none active" not in text and "not reported (status not ready" not in text


def test_lab_report_keyed_destinations_protected_with_transform(lab: DemoInputs) -> None:
    text = report(lab)
    keyed = [v for v in lab.visits if v.expected.startswith("protected")]
    assert {v.netns for v in keyed} >= {"oe-null", "oe-rsa", "oe-sw"}
    assert lab.status is not None
    status = Status.from_json(lab.status)
    for v in keyed:
        block = _block(text, v.name)
        assert block[0].rstrip().endswith("PROTECTED"), block
        esp = [c.transform for t in status.tunnels if t.peer == v.address for c in t.children]
        assert esp, f"the lab's status has no Child SA for {v.name}"
        line = next(ln for ln in block if ln.startswith("ESP "))
        assert all(tr in line for tr in esp), (line, esp)
        assert "engine: " in line  # the engine, or "not reported": never a claim of absence
        assert any(ln.startswith("IKE ") and "peer id" in ln for ln in block), block
        assert f"kernel SA: {', '.join(lab.kernel_sas[v.address])}" in block


def test_lab_report_bogus_is_the_expected_servfail(lab: DemoInputs) -> None:
    text = report(lab)
    row = _row(text, "www.bogus.test")
    assert "SERVFAIL" in row and "as intended" in row
    assert "FAILED" not in row
    assert all("bogus" not in m for m in _missing(text))


def test_lab_report_claims_nothing_missing(lab: DemoInputs) -> None:
    """Every destination behaved as the world expects, and the final status lacks nothing:
    the section says so instead of listing working parts as missing."""
    text = report(lab)
    assert _missing(text) == ["(nothing)"]
    assert "FAILED" not in text.split("Missing or not working")[0]


def test_lab_report_clear_destinations_are_clear_as_expected(lab: DemoInputs) -> None:
    text = report(lab)
    for v in lab.visits:
        if v.expected == "clear":
            assert _row(text, v.name).rstrip().endswith("clear, as expected")


# ------------------------------------------------------------------ (b) the first moment
def test_first_moment_status_is_not_ready_and_not_read_as_none() -> None:
    inputs = DemoInputs.from_json(_doc("first_moment.json"))
    assert inputs.status is not None
    reason = not_ready(Status.from_json(inputs.status))
    assert "no datapath reported yet" in reason and "DNS front" in reason
    text = report(inputs)
    assert "datapath  not reported (status not ready" in text
    assert "datapath  none" not in text.split("oe status (the final")[0]
    assert "none active" not in text
    # ESP flowed, but this document cannot confirm a tunnel: no verdict is made from it
    row = _row(text, "null.example.test")
    assert "unconfirmed" in row and "PROTECTED" not in row
    missing = _missing(text)
    assert len(missing) == 1 and "taken before the services reported" in missing[0]
    assert "as intended" in _row(text, "www.bogus.test")


def test_same_wire_evidence_with_the_final_status_is_protected() -> None:
    """The first-moment visits judged against a ready final status: PROTECTED."""
    first = DemoInputs.from_json(_doc("first_moment.json"))
    final = DemoInputs.from_json(_doc("engines.json"))
    inputs = DemoInputs(visits=first.visits, status=final.status)
    text = report(inputs)
    assert _row(text, "null.example.test").rstrip().endswith("PROTECTED")
    assert _missing(text) == ["(nothing)"]


# ------------------------------------------------------------------ (c) engines and tunnel engines
def test_engines_table_and_engine_per_tunnel() -> None:
    inputs = DemoInputs.from_json(_doc("engines.json"))
    text = report(inputs)
    assert "datapath  userspace-esp (" in text
    null = _block(text, "null.example.test")
    assert null[0].rstrip().endswith("PROTECTED")
    assert "ESP AES_GCM_16_256; engine: afalg" in null
    sw = _block(text, "sw.example.test")
    assert "ESP AES_CBC_256/HMAC_SHA2_256_128; engine: software" in sw
    assert "not reported" not in text.split("Evidence:")[0]
    head = "crypto engines (3, from the final status; offload phase ready)\n"
    table = text.split(head, 1)[1].splitlines()
    assert table[0].split() == ["name", "driver", "hardware", "KAT", "in", "use", "for"]
    virtio = next(ln for ln in table if ln.strip().startswith("afalg:virtio_crypto_aes_cbc "))
    assert virtio.split()[1:4] == ["virtio_crypto_aes_cbc", "yes", "1/2"]
    software = next(ln for ln in table if ln.strip().startswith("software "))
    assert software.split()[-2:] == ["aes256gcm16@<=511,", "aes256-sha256@all"]
    assert (
        "afalg:virtio_crypto_aes_cbc aes128-sha256: KAT failed: canary: case 2 sealed wrong "
        "bytes" in text
    )
    assert "esp proposal: aes256gcm16, aes128gcm16" in text
    # a failed transform on an engine not in use is the engine table's news, not a gap
    assert _missing(text) == ["(nothing)"]


def test_empty_tunnel_engine_says_not_reported() -> None:
    doc = _doc("engines.json")
    for t in doc["status"]["tunnels"]:
        t.pop("engine", None)
    text = report(DemoInputs.from_json(doc))
    assert "ESP AES_GCM_16_256; engine: not reported" in _block(text, "null.example.test")
    assert _missing(text) == ["(nothing)"]


# ------------------------------------------------------------------ genuine problems still show
def test_lab_record_of_a_broken_build_names_what_broke() -> None:
    """A real record from a lab whose package lacked the KAT vectors: nothing protected,
    the report says so and why, and still shows the working datapath and the SERVFAIL."""
    inputs = DemoInputs.from_json(_doc("lab_no_kat_vectors.json"))
    text = report(inputs)
    assert "datapath  kernel-xfrm (kernel has ESP (esp4) and XFRM netlink)" in text
    missing = _missing(text)
    for v in inputs.visits:
        if v.expected.startswith("protected"):
            assert _row(text, v.name).rstrip().endswith("CLEAR")
            assert f"{v.name}: CLEAR (world expects {v.expected})" in missing
    assert "no crypto engine passed a known-answer test (reasons under the engines)" in missing
    assert "offload proposes no ESP transform: IKE has nothing to offer" in missing
    assert "IKE SA up, no Child SA in the final status" in _block(text, "sw.example.test")
    assert "as intended" in _row(text, "www.bogus.test")
    assert not any("datapath" in m or "bogus" in m for m in missing)


def test_unexpected_outcomes_are_reported_as_such() -> None:
    doc = _doc("engines.json")
    visits = doc["visits"]
    visits[1].update(esp=0, clear=9)  # sw.example.test went out in the clear
    visits[3].update(dns_status="NOERROR", dns_answer=["203.0.113.22"], fetched=True, clear=8)
    text = report(DemoInputs.from_json(doc))
    assert _row(text, "sw.example.test").rstrip().endswith("CLEAR")
    assert _row(text, "www.bogus.test").rstrip().endswith("NOT REFUSED")
    missing = _missing(text)
    assert "sw.example.test: CLEAR (world expects protected-sw)" in missing
    assert any(m.startswith("www.bogus.test: NOT REFUSED") for m in missing)


def test_esp_without_a_tunnel_in_a_ready_final_status_is_not_protected() -> None:
    doc = _doc("engines.json")
    doc["status"]["tunnels"] = [t for t in doc["status"]["tunnels"] if t["peer"] != "203.0.113.12"]
    text = report(DemoInputs.from_json(doc))
    assert _row(text, "sw.example.test").rstrip().endswith("ESP seen, no tunnel")
    assert (
        "sw.example.test: ESP seen, no tunnel (the final status holds no tunnel for "
        "203.0.113.12)" in _missing(text)
    )


def test_a_real_none_datapath_is_a_gap() -> None:
    """A daemon whose stand-in reported why it has no datapath: that is a real lack."""
    doc = _doc("engines.json")
    reason = "none (the kernel has XFRM but no ESP (module esp4 missing); SAs are not installed)"
    doc["status"]["daemon"]["datapath"] = reason
    text = report(DemoInputs.from_json(doc))
    assert f"datapath  {reason}" in text
    assert f"datapath: {reason}" in _missing(text)


def test_mixed_traffic_is_a_leak() -> None:
    v = Visit("x.test", "x", "203.0.113.9", "protected-null", "NOERROR", ("203.0.113.9",),
              True, 5, 2, 2)  # fmt: skip
    o = judge(v, None)
    assert o.verdict == "MIXED (cleartext leaked)" and not o.as_expected


def test_no_status_at_all_is_said_once() -> None:
    inputs = DemoInputs.from_json(_doc("engines.json"))
    none = DemoInputs(inputs.visits, None, status_error="`oe status --json` exited 2: no daemon")
    text = report(none)
    assert "datapath  unknown: no final status (`oe status --json` exited 2" in text
    assert _missing(text) == [
        "no final `oe status` document: `oe status --json` exited 2: no daemon"
    ]
    assert "as intended" in _row(text, "www.bogus.test")


def test_recording_round_trips() -> None:
    doc = _doc("engines.json")
    inputs = DemoInputs.from_json(doc)
    assert DemoInputs.from_json(json.loads(json.dumps(inputs.to_json()))) == inputs
    assert copy.deepcopy(inputs) == inputs


# ------------------------------------------------------------------ parsing what the lab printed
DIG_SERVFAIL = """
; <<>> DiG 9.18.28-1~deb12u2-Debian <<>> +time=5 +tries=1 www.bogus.test A
;; global options: +cmd
;; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: SERVFAIL, id: 4242
;; flags: qr rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 1

;; OPT PSEUDOSECTION:
; EDNS: version: 0, flags:; udp: 1232
;; QUESTION SECTION:
;www.bogus.test.\t\t\tIN\tA

;; Query time: 412 msec
;; SERVER: 192.168.1.1#53(192.168.1.1) (UDP)
"""

DIG_NOERROR = """
; <<>> DiG 9.18.28-1~deb12u2-Debian <<>> +time=5 +tries=1 null.example.test A
;; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 777
;; flags: qr rd ra ad; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1

;; QUESTION SECTION:
;null.example.test.\t\tIN\tA

;; ANSWER SECTION:
www.example.test.\t300\tIN\tCNAME\tnull.example.test.
null.example.test.\t300\tIN\tA\t203.0.113.10

;; AUTHORITY SECTION:
example.test.\t300\tIN\tNS\t203.0.113.99
"""


def test_parse_dig() -> None:
    assert parse_dig(DIG_SERVFAIL) == ("SERVFAIL", ())
    assert parse_dig(DIG_NOERROR) == ("NOERROR", ("203.0.113.10",))
    timeout = ";; communications error to 192.168.1.1#53: timed out\n;; no servers could be reached"
    assert parse_dig(timeout) == ("timeout", ())
    assert parse_dig("") == ("?", ())


XFRM_STATE = """src 203.0.113.2 dst 203.0.113.10
\tproto esp spi 0xc1a2b3c4 reqid 1 mode tunnel
\treplay-window 0 flag af-unspec
\taead rfc4106(gcm(aes)) 0x00112233445566778899aabbccddeeff0011223344556677889900aa 128
\tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0
src 203.0.113.12 dst 203.0.113.2
\tproto esp spi 0xd5e6f7a8 reqid 2 mode tunnel
\tauth-trunc hmac(sha256) 0xfeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedface 128
\tenc cbc(aes) 0xdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef
"""


def test_kernel_sa_algorithms_keeps_names_never_keys() -> None:
    sas = kernel_sa_algorithms(XFRM_STATE)
    assert sas == {
        "203.0.113.2": ("hmac(sha256) + cbc(aes)", "rfc4106(gcm(aes))"),
        "203.0.113.10": ("rfc4106(gcm(aes))",),
        "203.0.113.12": ("hmac(sha256) + cbc(aes)",),
    }
    assert "0x" not in json.dumps(sas)
