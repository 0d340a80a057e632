"""The `make demo` report, as a pure function of what the demo recorded.

Why pure: the demo's old report judged the product from the first `oe status` document, taken
as soon as the control socket answered and before any service had reported, and so claimed
"datapath: none" while `oe status` showed kernel-xfrm. Here every verdict comes from the
*final* status document (taken after the scenario, read through the product's own
``Status.from_json``) and from the wire evidence, and a unit test runs the report on
recorded documents (tests/unit/test_demo_report.py).

A destination is PROTECTED only when ESP to its address was captured on the WAN, no
cleartext HTTP was, and the final status holds a tunnel for that peer. Expected outcomes
(clear for keyless names, SERVFAIL for bogus DNSSEC) are said as expected; only a genuinely
unexpected outcome, or something the final status really lacks, is listed as a problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from oe_router.cli import _kat_summary, _table, render_status
from oe_router.control import Status, TunnelStatus

JsonObject = dict[str, Any]

#: How the evidence is counted (demo.py's capture filters say the same in BPF).
EVIDENCE = (
    "Evidence: packets to/from the address on the router's WAN link (world side of the "
    "cable); ESP = IP proto 50 or UDP-encapsulated ESP, clear = TCP port 80, IKE = UDP 500 "
    "or non-ESP UDP 4500."
)


@dataclass(frozen=True)
class Visit:
    """What the LAN client got for one destination, and what the WAN wire carried.

    ``expected`` is labkit's world.json outcome (protected-null, protected-rsa,
    protected-sw, clear, servfail); ``dns_status`` the rcode the client's resolver (the
    router) answered, or ``timeout``; ``esp``/``clear``/``ike`` packet counts to and from
    ``address`` during the visit.
    """

    name: str
    netns: str
    address: str
    expected: str
    dns_status: str
    dns_answer: tuple[str, ...]
    fetched: bool
    esp: int
    clear: int
    ike: int

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "netns": self.netns,
            "address": self.address,
            "expected": self.expected,
            "dns_status": self.dns_status,
            "dns_answer": list(self.dns_answer),
            "fetched": self.fetched,
            "esp": self.esp,
            "clear": self.clear,
            "ike": self.ike,
        }

    @classmethod
    def from_json(cls, obj: JsonObject) -> Visit:
        return cls(
            name=str(obj["name"]),
            netns=str(obj["netns"]),
            address=str(obj["address"]),
            expected=str(obj.get("expected", "")),
            dns_status=str(obj["dns_status"]),
            dns_answer=tuple(str(a) for a in obj.get("dns_answer", ())),
            fetched=bool(obj["fetched"]),
            esp=int(obj["esp"]),
            clear=int(obj["clear"]),
            ike=int(obj["ike"]),
        )


@dataclass(frozen=True)
class DemoInputs:
    """Everything the report is made of, recorded by demo.py (and saved as JSON beside
    the run's logs, so a report can be made again, or tested, without the lab).

    ``status``: the final ``oe status --json`` document, taken after the scenario (None:
    none could be taken, ``status_error`` says why). ``offload``: ``oe offload --json``
    (None where the daemon has no such command). ``kernel_sas``: peer address -> ESP
    algorithm names of the router's kernel SAs (names only: never keys).
    ``lab_problems``: parts of the lab or of the start-up that failed, said plainly.
    """

    visits: tuple[Visit, ...]
    status: JsonObject | None
    offload: JsonObject | None = None
    kernel_sas: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lab_problems: tuple[str, ...] = ()
    status_error: str = ""

    def to_json(self) -> JsonObject:
        return {
            "visits": [v.to_json() for v in self.visits],
            "status": self.status,
            "offload": self.offload,
            "kernel_sas": {k: list(v) for k, v in sorted(self.kernel_sas.items())},
            "lab_problems": list(self.lab_problems),
            "status_error": self.status_error,
        }

    @classmethod
    def from_json(cls, obj: JsonObject) -> DemoInputs:
        return cls(
            visits=tuple(Visit.from_json(v) for v in obj.get("visits", ())),
            status=obj.get("status"),
            offload=obj.get("offload"),
            kernel_sas={str(k): tuple(v) for k, v in obj.get("kernel_sas", {}).items()},
            lab_problems=tuple(str(p) for p in obj.get("lab_problems", ())),
            status_error=str(obj.get("status_error", "")),
        )


@dataclass(frozen=True)
class Outcome:
    """The verdict on one visit: the words, and whether the world expected it."""

    verdict: str
    as_expected: bool
    why: str = ""


# ---------------------------------------------------------------- parsing what the lab printed
_DIG_STATUS = re.compile(r"->>HEADER<<-.*\bstatus:\s*([A-Z]+)")
_DIG_ANSWER = re.compile(r"^\S+\s+\d+\s+IN\s+(?:A|AAAA)\s+(\S+)\s*$", re.M)


def parse_dig(text: str) -> tuple[str, tuple[str, ...]]:
    """`dig NAME A` output -> (rcode, addresses in the answer); ``timeout`` when dig got
    no reply at all, ``?`` when the output is not dig's."""
    m = _DIG_STATUS.search(text)
    if m is None:
        return ("timeout" if "timed out" in text or "no servers" in text else "?"), ()
    section = text.split(";; ANSWER SECTION:", 1)
    answers = _DIG_ANSWER.findall(section[1].split("\n\n", 1)[0]) if len(section) == 2 else []
    return m.group(1), tuple(answers)


def kernel_sa_algorithms(xfrm_state: str) -> dict[str, tuple[str, ...]]:
    """`ip xfrm state` -> peer address -> ESP algorithm names (``aead``/``enc``/``auth``
    lines' second word). The keys printed next to them are never kept."""
    out: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=src )", xfrm_state):
        m = re.match(r"src (\S+) dst (\S+)", block)
        if not m or "proto esp" not in block:
            continue
        algs = re.findall(r"^\s*(?:aead|enc|auth-trunc|auth)\s+(\S+)", block, re.M)
        desc = " + ".join(algs) or "?"
        for addr in m.groups():
            out.setdefault(addr, set()).add(desc)
    return {a: tuple(sorted(d)) for a, d in out.items()}


# ---------------------------------------------------------------- reading the status model
def not_ready(status: Status) -> str:
    """Why ``status`` was taken before the services reported ("" once they have).

    The daemon answers `oe status` as soon as its control socket is up; until the OE
    service (or the stand-in that says why there is none) reports, the datapath reads as
    a bare ``none``, and until the DNS front is listening its section is empty. Such a
    document says nothing about what the product lacks."""
    waiting: list[str] = []
    if status.daemon.datapath in ("", "none"):
        waiting.append("no datapath reported yet")
    if "dns" in status.daemon.services and "listen" not in status.dns:
        waiting.append("the DNS front has not reported yet")
    return "; ".join(waiting)


def tunnel_rows(status: Status, peer: str) -> tuple[list[TunnelStatus], list[TunnelStatus]]:
    """(the OE manager's Child SA rows, the IKE layer's IKE SA rows) for ``peer`` that
    are up (established, or rekeying with the old SAs still in place)."""
    up = ("established", "rekeying")
    rows = [t for t in status.tunnels if t.peer == peer and t.state in up]
    return [t for t in rows if t.source != "ike"], [t for t in rows if t.source == "ike"]


def has_child_sa(status: Status, peer: str) -> bool:
    """A tunnel for ``peer``: an ESP SA pair, not only an IKE SA (which carries no data)."""
    oe_rows, ike_rows = tunnel_rows(status, peer)
    return bool(oe_rows) or any(t.children for t in ike_rows)


def judge(visit: Visit, status: Status | None, unready: str = "") -> Outcome:
    """One visit's verdict from the wire counts, the DNS answer and the final status."""
    exp = visit.expected
    want_protected = exp.startswith("protected")
    if exp == "servfail":
        if visit.dns_status == "SERVFAIL" and not visit.fetched and not visit.esp + visit.clear:
            return Outcome("refused: bogus DNSSEC (SERVFAIL), as intended", True)
        if visit.dns_answer or visit.fetched:
            got = ", ".join(visit.dns_answer) or "an address"
            return Outcome(
                "NOT REFUSED",
                False,
                f"bogus DNSSEC, yet the client got {got}"
                + (" and fetched the page" if visit.fetched else ""),
            )
        return Outcome(f"DNS {visit.dns_status}", False, "bogus DNSSEC should give SERVFAIL")
    if visit.dns_status != "NOERROR" or not visit.dns_answer:
        return Outcome(
            f"DNS {visit.dns_status}", False, f"world expects {exp}; the name did not resolve"
        )
    if visit.esp and visit.clear:
        return Outcome(
            "MIXED (cleartext leaked)", False,
            f"{visit.clear} cleartext HTTP packet(s) next to {visit.esp} ESP",
        )  # fmt: skip
    if visit.esp:
        if status is None:
            return Outcome("ESP seen, unconfirmed", False, "no final status to confirm a tunnel")
        if not has_child_sa(status, visit.address):
            if unready:
                return Outcome("ESP seen, unconfirmed", False, f"status not ready: {unready}")
            return Outcome(
                "ESP seen, no tunnel", False,
                f"the final status holds no tunnel for {visit.address}",
            )  # fmt: skip
        if not visit.fetched:
            return Outcome("PROTECTED, fetch FAILED", False, "ESP flowed but no page came back")
        if want_protected:
            return Outcome("PROTECTED", True)
        return Outcome("PROTECTED", False, f"world expects {exp}")
    if visit.clear:
        if not visit.fetched:
            return Outcome("clear, fetch FAILED", False, "cleartext flowed but no page came back")
        if exp == "clear":
            return Outcome("clear, as expected", True)
        return Outcome("CLEAR", False, f"world expects {exp}")
    return Outcome("no traffic", False, f"world expects {exp}; nothing on the wire")


# ---------------------------------------------------------------- the report
def _datapath_line(status: Status | None, unready: str, error: str) -> str:
    if status is None:
        return f"datapath  unknown: no final status ({error or 'not taken'})"
    d = status.daemon.datapath
    if d in ("", "none"):
        return f"datapath  not reported (status not ready: {unready})"
    return f"datapath  {d}"


def _transforms(oe_rows: list[TunnelStatus], ike_rows: list[TunnelStatus]) -> str:
    """The ESP transform as IKE negotiated it (with key size and integrity), else the
    OE manager's name for it."""
    names = [c.transform for t in ike_rows for c in t.children if c.transform]
    names = names or [t.transform for t in oe_rows if t.transform]
    return ", ".join(dict.fromkeys(names)) or "not reported"


def _engines(oe_rows: list[TunnelStatus]) -> str:
    names = [t.engine for t in oe_rows if t.engine]
    return ", ".join(dict.fromkeys(names)) or "not reported"


def _details(v: Visit, status: Status | None, sas: dict[str, tuple[str, ...]]) -> list[str]:
    pad = " " * 4
    out: list[str] = []
    if status is not None:
        oe_rows, ike_rows = tunnel_rows(status, v.address)
        if has_child_sa(status, v.address):
            out.append(f"{pad}ESP {_transforms(oe_rows, ike_rows)}; engine: {_engines(oe_rows)}")
        elif ike_rows:
            out.append(f"{pad}IKE SA up, no Child SA in the final status")
        out += [
            f"{pad}IKE {t.transform or '?'}, auth {t.local_auth or '-'}/{t.remote_auth or '-'}"
            f" (peer id {t.remote_id or '-'})" + (f", NAT-T {t.nat}" if t.nat else "")
            for t in ike_rows
        ]
    if v.address in sas:
        out.append(f"{pad}kernel SA: {', '.join(sas[v.address])}")
    return out


def _engine_table(status: Status, offload: JsonObject | None) -> list[str]:
    phase = f"; offload phase {offload.get('phase')}" if offload and "phase" in offload else ""
    out = ["", f"crypto engines ({len(status.engines)}, from the final status{phase})"]
    if status.engines:
        out += _table(
            ["name", "driver", "hardware", "KAT", "in use for"],
            [
                [
                    e.name,
                    e.driver or "-",
                    "yes" if e.hardware or e.kind == "hardware" else "no",
                    _kat_summary(e),
                    ", ".join(e.in_use_for) or "-",
                ]
                for e in status.engines
            ],
        )
        out += [f"  {e.name}: {e.reason}" for e in status.engines if e.reason]
        out += [
            f"  {e.name} {t.transform}: KAT failed: {t.reason or 'no reason given'}"
            for e in status.engines
            for t in e.transforms
            if t.kat == "failed"
        ]
    else:
        out.append("  (the status lists no engine)")
    if offload is not None:
        proposal = offload.get("proposal")
        if proposal is not None:
            out.append(f"  esp proposal: {', '.join(proposal) or '(none usable)'}")
        kernel = offload.get("kernel_usable")
        if kernel is not None:
            checked = "" if offload.get("kernel_checked") else " (not all checked yet)"
            out.append(f"  kernel drivers that passed: {', '.join(kernel) or '-'}{checked}")
    return out


def _gaps(status: Status | None, offload: JsonObject | None, unready: str, error: str) -> list[str]:
    """What the final status really lacks (never what an early document had not yet)."""
    if status is None:
        return [f"no final `oe status` document: {error or 'not taken'}"]
    if unready:
        return [
            f"the final status was taken before the services reported ({unready}); "
            "it cannot confirm any tunnel"
        ]
    out: list[str] = []
    d = status.daemon.datapath
    if d.startswith("none"):  # a stand-in reported why there is no datapath
        out.append(f"datapath: {d}")
    if "dns" not in status.daemon.services:
        out.append("oe-routerd runs no DNS front: IPSECKEY answers trigger nothing")
    elif status.dns.get("oe_manager") == "none":
        out.append("the DNS front has no OE manager: IPSECKEY answers trigger no tunnel")
    verdicts = [t.kat for e in status.engines for t in e.transforms]
    if "failed" in verdicts and "passed" not in verdicts and "pending" not in verdicts:
        out.append("no crypto engine passed a known-answer test (reasons under the engines)")
    if offload is not None and offload.get("proposal") == []:
        out.append("offload proposes no ESP transform: IKE has nothing to offer")
    return out


def report(inputs: DemoInputs) -> str:
    """The demo's text, from the recorded inputs alone."""
    status: Status | None = None
    error = inputs.status_error
    if inputs.status is not None:
        try:
            status = Status.from_json(inputs.status)
        except (KeyError, TypeError, ValueError) as exc:
            error = f"the final status could not be read ({exc})"
    unready = not_ready(status) if status is not None else ""

    lines = ["", "oe-router lab demo: what the LAN client's traffic looked like on the WAN", ""]
    lines.append(_datapath_line(status, unready, error))
    lines.append("(verdicts from the final `oe status`, taken after the scenario, and the wire)")
    lines.append("")
    rows: list[list[str]] = []
    details: list[list[str]] = []
    problems: list[str] = list(inputs.lab_problems)
    for v in inputs.visits:
        o = judge(v, status, unready)
        # without a usable final status the one line from _gaps says why nothing is confirmed
        if not o.as_expected and not (
            o.verdict.endswith("unconfirmed") and (unready or status is None)
        ):
            problems.append(f"{v.name}: {o.verdict}" + (f" ({o.why})" if o.why else ""))
        fetch = "fetched" if v.fetched else ("-" if v.expected == "servfail" else "FAILED")
        rows.append(
            [v.name, ", ".join(v.dns_answer) or "-", v.dns_status, fetch,
             str(v.esp), str(v.clear), str(v.ike), o.verdict]
        )  # fmt: skip
        details.append(_details(v, status, inputs.kernel_sas))
    table = _table(
        ["destination", "address", "DNS", "page", "ESP", "clear", "IKE", "verdict"], rows
    )
    lines.append(table[0])
    for row, extra, v in zip(table[1:], details, inputs.visits, strict=True):
        lines.append(row)
        lines += extra
        lines.append(f"    world expects: {v.expected}")
    lines += ["", EVIDENCE]
    if status is not None:
        lines += _engine_table(status, inputs.offload)
    problems += _gaps(status, inputs.offload, unready, error)
    lines += ["", "Missing or not working (from the final status and the wire):"]
    lines += [f"  - {p}" for p in problems] or ["  (nothing)"]
    if status is not None:
        lines += ["", "oe status (the final document, as `oe status` prints it):"]
        lines += ["  " + ln for ln in render_status(status).splitlines()]
    return "\n".join(lines)
