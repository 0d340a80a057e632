"""`oe`: the command-line face of the daemon (status, reload) and of the config checker.

Exit codes: 0 success, 1 a refusal (config problems, reload refused, the
daemon answered with an error), 2 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from oe_router.config import (
    DEFAULT_CONFIG_PATH,
    ConfigProblem,
    control_socket_of,
    validate_file,
)
from oe_router.control import DEFAULT_CONTROL_SOCKET
from oe_router.control.client import ControlClient, ControlError, DaemonUnreachable
from oe_router.control.protocol import COMMAND_ARGS

# Imported where used: the status model and the policy modules cost start-up time, which
# `oe status --json`, `oe down` and `oe flush` (scripts, a slow router) need none of.
if TYPE_CHECKING:
    from oe_router.control.status import EngineStatus, ProposalOffers, Status
    from oe_router.devview import DevicesView, Explanation

T = TypeVar("T")  # a parsed reply document (_show)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _opt(value: float | None, fmt: str = "{:.0f}s") -> str:
    return "-" if value is None else fmt.format(value)


def _traffic(nbytes: int, packets: int) -> str:
    """A Child SA direction's counters: exact bytes (scripts compare them) and packets."""
    return f"{nbytes}B/{packets}p"


def _network_lines(network: dict[str, Any]) -> list[str]:
    """``WAN  wan (eth1, netifd), wan6 (eth1, netifd): 203.0.113.2, 2001:db8:1::2``."""
    out = []
    for key, label, what in (("wan", "WAN", "addresses"), ("lan", "LAN", "prefixes")):
        part = network.get(key)
        if not isinstance(part, dict):
            continue
        names = ", ".join(part.get("networks", [])) or "?"
        values = ", ".join(part.get(what, [])) or "none"
        line = f"{label:<9} {names}: {values}"
        if part.get("problem"):
            line += f"  (OE off: {part['problem']})"
        out.append(line)
    return out


def render_status(status: Status) -> str:
    """The human `oe status` view: daemon summary, then one table per section."""
    d = status.daemon
    tunnels = [t for t in status.tunnels if t.source != "ike"]  # IKE SAs get their own table
    if d.last_reload is None:
        reload_text = "none since start"
    elif d.last_reload.accepted:
        reload_text = f"accepted at {_duration(d.last_reload.at_uptime_s)}"
    else:
        n = len(d.last_reload.problems)
        reload_text = f"REFUSED ({n} problem(s)) at {_duration(d.last_reload.at_uptime_s)}"
    out = [
        f"oe-routerd {d.version}  pid {d.pid}  up {_duration(d.uptime_s)}"
        f"  {'enabled' if d.enabled else 'DISABLED'}",
        f"config    {d.config_path} (generation {d.config_generation}; last reload: {reload_text})",
        f"datapath  {d.datapath}" + _policy_count(d.datapath_stats),
        f"services  {', '.join(d.services) or 'none yet'}",
        *_network_lines(d.network),
        "",
        f"tunnels ({len(tunnels)})",
    ]
    if tunnels:
        out += _table(
            [
                "peer",
                "local",
                "remote",
                "state",
                "policy",
                "transform",
                "engine",
                "up",
                "in",
                "out",
            ],
            [
                [
                    t.peer,
                    t.local,
                    t.remote,
                    t.state,
                    t.policy,
                    t.transform,
                    t.engine or "-",
                    _opt(t.established_s),
                    _traffic(t.bytes_in, t.packets_in),
                    _traffic(t.bytes_out, t.packets_out),
                ]
                for t in tunnels
            ],
        )
    out += _render_ike(status)
    out += _render_ike_endpoint(status.ike)
    out += _render_mismatches(status.ike.get("proposal_mismatches"))
    out += ["", f"shunts ({len(status.shunts)})"]
    if status.shunts:
        out += _table(
            ["destination", "kind", "expires", "reason"],
            [[s.destination, s.kind, _opt(s.expires_s), s.reason] for s in status.shunts],
        )
        for s in status.shunts:
            if s.offers is not None:
                out += [f"  {s.destination}:", *_offers_lines(s.offers)]
    out += ["", f"engines ({len(status.engines)})"]
    if status.engines:
        out += _table(
            ["name", "driver", "hw", "state", "KAT", "Mbit/s@1400", "in use for"],
            [
                [
                    e.name,
                    e.driver or "-",
                    "yes" if e.hardware or e.kind == "hardware" else "no",
                    e.state or "-",
                    _kat_summary(e),
                    _opt(e.mbit_s, "{:.0f}"),
                    ", ".join(e.in_use_for) or ("yes" if e.selected else "-"),
                ]
                for e in status.engines
            ],
        )
        out += [f"  {e.name}: {e.reason}" for e in status.engines if e.reason]
    out += ["", "dns"]
    if status.dns:
        out += _table(["key", "value"], [[k, _dns_value(v)] for k, v in status.dns.items()])
    else:
        out.append("  (no DNS front running; capture off: dnsmasq asks its own upstreams)")
    if status.trust_anchors:
        out += ["", f"trust anchors ({len(status.trust_anchors)})"]
        out += _table(
            ["zone", "key", "alg", "state", "since", "until"],
            [
                [a.zone, str(a.key_tag), str(a.algorithm), a.state, a.since, a.until or "-"]
                for a in status.trust_anchors
            ],
        )
    return "\n".join(out)


def _policy_count(stats: dict[str, Any]) -> str:
    """``; 40 policies`` from the datapath's count (absent from older daemons)."""
    n = stats.get("policies")
    return f"; {n} policies" if isinstance(n, int) else ""


def _render_ike(status: Status) -> list[str]:
    """IKE SAs and their Child SAs: identities, auth, algorithms, SPIs, age, rekey-in."""
    rows = [t for t in status.tunnels if t.source == "ike"]
    out = ["", f"ike sas ({len(rows)})"]
    for t in rows:
        out.append(
            f"  {t.peer}  {t.state}  {t.role}  {t.local} <-> {t.remote}"
            + (f"  NAT-T ({t.nat})" if t.nat else "")
        )
        out.append(
            f"    ids {t.local_id or '-'} <-> {t.remote_id or '-'}"
            f"  auth {t.local_auth or '-'} / {t.remote_auth or '-'}"
        )
        out.append(
            f"    {t.transform or '-'}  spis {t.ike_spis}"
            f"  age {_opt(t.established_s)}  rekey-in {_opt(t.rekey_in_s)}"
        )
        if t.children:
            out += [
                "  " + line
                for line in _table(
                    ["child spi in/out", "mode", "transform", "local ts", "remote ts",
                     "encap", "age", "rekey-in"],
                    [
                        [
                            f"{c.spi_in}/{c.spi_out}",
                            c.mode,
                            c.transform,
                            c.ts_local,
                            c.ts_remote,
                            "udp" if c.udp_encap else "-",
                            _opt(c.established_s),
                            _opt(c.rekey_in_s),
                        ]
                        for c in t.children
                    ],
                )
            ]  # fmt: skip
    return out


#: The "ike" object's counters by line of the text view: (label, ((key, words), ...)). A
#: line shows its non-zero counters only and is left out when all are zero; the non-zero
#: counters no line names (a newer daemon's too) go on a last "counters" line.
_IKE_COUNTER_LINES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("refused", (("half_open_refused_source", "per source"),
                 ("half_open_refused_prefix", "per prefix"),
                 ("half_open_refused_global", "no slot"),
                 ("refused", "by policy"))),
    ("given up", (("half_open_displaced", "displaced"), ("half_open_expired", "expired"))),
    ("cookies", (("cookies_sent", "demanded"), ("cookies_accepted", "accepted"))),
    ("key lookup", (("peer_key_lookups_found", "initiator keys found"),
                    ("peer_key_lookups_refused", "refused"))),
    ("fragments", (("fragments_dropped", "dropped"),
                   ("fragment_messages_abandoned", "messages abandoned"),
                   ("fragment_bytes", "bytes held"))),
)  # fmt: skip
#: keys of the "ike" object the half-open and limits lines show (gauges and settings), and
#: the sum of the refusals by reason
_IKE_TABLE_KEYS = frozenset({
    "half_open", "half_open_known", "half_open_unverified", "half_open_sources",
    "half_open_prefixes", "half_open_largest_prefix", "peers_with_sa", "half_open_limit",
    "half_open_per_source", "half_open_per_prefix", "half_open_reserve", "cookie_threshold",
    "cookies_demanded", "half_open_dropped",
})  # fmt: skip


def _render_ike_endpoint(ike: dict[str, Any]) -> list[str]:
    """The IKE endpoint under attack or not: its half-open table against its limits, then
    what it refused, gave up, answered with a COOKIE and dropped (non-zero counts only)."""
    out = ["", "ike endpoint"]
    if not ike:
        return [*out, "  (no IKE endpoint running)"]
    g = ike.get
    if "half_open" in ike:  # absent from a daemon older than the half-open table
        out.append(
            f"  half-open  {g('half_open')}/{g('half_open_limit')}: {g('half_open_known')} known,"
            f" {g('half_open_unverified')} unverified, from {g('half_open_sources')} sources in"
            f" {g('half_open_prefixes')} prefixes (largest {g('half_open_largest_prefix')});"
            f" {g('peers_with_sa')} peers with an IKE SA"
        )
        out.append(
            f"  limits     per source {g('half_open_per_source')}, per prefix"
            f" {g('half_open_per_prefix')}, reserve {g('half_open_reserve')} for known peers,"
            f" COOKIEs from {g('cookie_threshold')} half-open"
            + (" (demanded now)" if g("cookies_demanded") else "")
        )
    ident = g("identity")
    if isinstance(ident, dict):  # absent from a daemon older than first-start keys
        key = f", key {ident['key']}" if ident.get("key") else ", no key"
        publish = f", IPSECKEY {ident['ipseckey']}" if ident.get("ipseckey") else ""
        out.append(f"  identity   {ident.get('local_id', '-')}{key}{publish}")
    addresses = g("addresses")
    if isinstance(addresses, list):  # absent from a daemon older than WAN re-learning
        out.append(f"  addresses  {', '.join(map(str, addresses)) or 'none'}")
    named = _IKE_TABLE_KEYS.union(k for _, keys in _IKE_COUNTER_LINES for k, _ in keys)
    rest = tuple((k, k) for k in ike if k not in named)
    for label, keys in (*_IKE_COUNTER_LINES, ("counters", rest)):
        shown = [f"{words} {g(k)}" for k, words in keys if isinstance(g(k), int) and g(k)]
        if shown:
            out.append(f"  {label:<10} {', '.join(shown)}")
    return out


def _offers_lines(o: ProposalOffers) -> list[str]:
    """Both sides' proposals of a NO_PROPOSAL_CHOSEN, ours and theirs, one line each."""
    ours = ", ".join(o.ours) or "nothing"
    if o.theirs is None:
        return [
            f"    we offered   {o.protocol} {ours}",
            "    peer offered (not known: the peer only said NO_PROPOSAL_CHOSEN)",
        ]
    return [
        f"    peer offered {o.protocol} {', '.join(o.theirs) or 'nothing'}",
        f"    we accept    {o.protocol} {ours}",
    ]


def _render_mismatches(rows: Any) -> list[str]:
    """The IKE service's latest NO_PROPOSAL_CHOSEN per peer (absent from older daemons)."""
    if not isinstance(rows, list) or not rows:
        return []
    out = ["", f"proposal mismatches ({len(rows)})"]
    for r in rows:
        from oe_router.control.status import ProposalOffers

        o = ProposalOffers.from_json(r)
        who = "the peer" if o.refused_by == "peer" else "us"
        out.append(f"  {r.get('peer')}  {o.protocol} refused by {who}, {_opt(r.get('age_s'))} ago")
        out += _offers_lines(o)
    return out


def _kat_summary(e: EngineStatus) -> str:
    """``5/5 passed``, ``3/5 passed`` or, from a daemon that sends no detail, yes/no."""
    runs = [t for t in e.transforms if t.kat != "unsupported"]
    if not runs:
        return "passed" if e.proven else "-"
    passed = sum(t.kat == "passed" for t in runs)
    pending = sum(t.kat == "pending" for t in runs)
    text = f"{passed}/{len(runs)} passed"
    return text + (f", {pending} pending" if pending else "")


def _render_selftest(sec: Any) -> list[str]:
    """The kernel datapath's end-to-end ESP self-test: verdict and offer per transform."""
    if not isinstance(sec, dict):
        return []
    rows = []
    for name, t in sorted(sec.get("transforms", {}).items()):
        res = t.get("result") or {}
        rows.append(
            [
                name,
                str(t.get("state", "-")) + (" (stale)" if t.get("stale") else ""),
                str(res.get("driver") or "-"),
                "yes" if t.get("offered") else "no",
                str(t.get("why_not") or t.get("note") or ""),
            ]
        )
    first = sec.get("first_offer_s")
    out = [
        "",
        f"kernel ESP self-test  offer {', '.join(sec.get('offer', [])) or '(none yet)'}"
        + (f"  (first offered {first:g}s after start)" if isinstance(first, int | float) else ""),
    ]
    if rows:
        out += _table(["transform", "self-test", "driver", "offered", "why not"], rows)
    for m in sec.get("moves", [])[-3:]:
        out.append(
            f"  moved a Child SA with {m.get('peer')} off {m.get('transform')}: "
            f"{m.get('error') or 'done'} in {m.get('took_s')}s"
        )
    return out


def render_offload(doc: dict[str, Any]) -> str:
    """The ``oe offload`` view of the ``offload`` command's document: one row per engine
    and transform (driver, hardware?, KAT, Mbit/s per size, the sizes it is used for),
    then the IKE proposal order, the reasons and the recent events."""
    from oe_router.control.status import EngineStatus

    engines = [EngineStatus.from_json(e) for e in doc.get("engines", [])]
    sizes = sorted({r.size for e in engines for t in e.transforms for r in t.rates}) or [
        64,
        512,
        1400,
    ]
    canary = doc.get("canary_interval_s")
    out = [
        f"offload {doc.get('offload', '?')}  phase {doc.get('phase', '?')}"
        f"  canary {'off' if not canary else f'every {canary:g}s'}"
        f"  hotplug {doc.get('watch', '?')}",
        "",
        f"engines ({len(engines)})",
    ]
    rows: list[list[str]] = []
    for e in engines:
        hw = "yes" if e.hardware or e.kind == "hardware" else "no"
        if not e.transforms:
            rows.append([e.name, e.driver or "-", hw, "-", e.state or "-", *("-" for _ in sizes),
                         "-"])  # fmt: skip
        for t in e.transforms:
            rate = {r.size: r.mbit_s for r in t.rates}
            rows.append(
                [
                    e.name,
                    t.driver or "-",
                    hw,
                    t.transform,
                    t.kat.upper() if t.kat == "failed" else t.kat,
                    *(_opt(rate.get(size), "{:.0f}") for size in sizes),
                    t.in_use_for or "-",
                ]
            )
    if rows:
        out += _table(
            ["engine", "driver", "hw", "transform", "KAT", *(f"Mbit/s@{s}" for s in sizes),
             "in use for"],
            rows,
        )  # fmt: skip
    reasons = [f"  {e.name}: {e.reason}" for e in engines if e.reason]
    reasons += [
        f"  {e.name} {t.transform}: {t.reason}" for e in engines for t in e.transforms if t.reason
    ]
    if reasons:
        out += ["", "why not", *reasons]
    proposal = doc.get("proposal")
    if proposal is not None:
        out += ["", f"esp proposal  {', '.join(proposal) or '(none usable)'}"]
    kernel = doc.get("kernel_usable")
    if kernel is not None:
        checked = "" if doc.get("kernel_checked") else " (not checked yet)"
        out.append(f"kernel drivers pass  {', '.join(kernel) or '-'}{checked}")
    out += _render_selftest(doc.get("kernel_selftest"))
    notes = doc.get("table", {}).get("notes", [])
    if notes:
        out += ["", "notes", *(f"  {n}" for n in notes)]
    events = doc.get("events", [])
    if events:
        out += ["", "events", *(f"  {ev}" for ev in events)]
    return "\n".join(out)


def _dns_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def render_devices(view: DevicesView) -> str:
    """One block per device: who it is, its flow counts, a row per destination."""
    lines: list[str] = []
    for d in view.devices:
        who = " ".join(x for x in (d.hostname, d.mac) if x)
        lines.append(
            f"device {d.address}" + (f" ({who})" if who else "")
            + f": {d.flows_protected} encrypted, {d.flows_clear} clear"
            + (f", {d.flows_blocked} blocked" if d.flows_blocked else "")
            + (f", {d.flows_pending} pending" if d.flows_pending else "")
            + " flow(s)"
        )  # fmt: skip
        rows = []
        for x in d.destinations:
            t = x.tunnel
            peer = "-" if t is None else t.peer
            spis = "-" if t is None or not t.spi_in else f"{t.spi_in}/{t.spi_out}"
            auth = "-" if t is None or not t.remote_auth else t.remote_auth
            rows.append(
                [x.address, x.dns_name or "-", x.state, str(x.flows), ",".join(x.services),
                 peer, spis, auth, x.reason]
            )  # fmt: skip
        if rows:
            headers = ["DESTINATION", "DNS NAME", "STATE", "FLOWS", "SERVICES", "PEER",
                       "SPIS IN/OUT", "AUTH", "WHY"]  # fmt: skip
            lines += ["  " + line for line in _table(headers, rows)]
        else:
            lines.append("  no flows outside the LAN")
    if not view.devices:
        lines.append("no LAN device has flows")
    more = " (truncated)" if view.truncated else ""
    lines.append(f"{view.flows_read} conntrack entries read{more}")
    lines += [f"note: {n}" for n in view.notes]
    return "\n".join(lines)


def render_explain(e: Explanation) -> str:
    covered = f"{e.entry}" if e.entry else "no policy entry"
    if e.group:
        covered = f"policy group {e.group} (entry {e.entry})"
    elif e.entry:
        covered = f"exclusion {e.entry}"
    lines = [
        f"{e.address}" + (f" ({e.dns_name})" if e.dns_name else "") + f": {covered}",
        f"  now: {e.now}",
        f"  state: {e.state} ({e.reason})",
        f"  a new flow {e.new_flow}",
    ]
    return "\n".join(lines)


def _show(
    out: TextIO,
    as_json: bool,
    doc: Any,
    parse: Callable[[Any], T],
    render: Callable[[T], str],
    what: str,
) -> int:
    """A reply's document as JSON, or parsed and rendered as text (one error for a
    document this CLI cannot read: a daemon of another version)."""
    if as_json:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    try:
        obj = parse(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ControlError(f"daemon sent {what} this oe cannot read ({exc})") from None
    out.write(render(obj) + "\n")
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, out: TextIO) -> int:
    from oe_router.devview import DevicesView

    request: dict[str, Any] = {} if args.device is None else {"device": args.device}
    reply = ControlClient(args.socket).request("devices", **request)
    doc = reply.get("devices")
    return _show(out, args.json, doc, DevicesView.from_json, render_devices, "a device view")


def cmd_explain(args: argparse.Namespace, out: TextIO) -> int:
    from oe_router.devview import Explanation

    reply = ControlClient(args.socket).request("explain", address=args.address)
    doc = reply.get("explain")
    return _show(out, args.json, doc, Explanation.from_json, render_explain, "an explanation")


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    if args.device is not None:
        return cmd_devices(args, out)
    reply = ControlClient(args.socket).request("status")

    def parse(doc: Any) -> Status:
        from oe_router.control.status import Status

        return Status.from_json(doc)

    return _show(out, args.json, reply["status"], parse, render_status, "a status")


def cmd_offload(args: argparse.Namespace, out: TextIO) -> int:
    """The engines table; ``bench`` has the daemon measure again first (and waits)."""
    if args.action == "bench":
        reply = ControlClient(args.socket, timeout=args.timeout).request("offload-bench")
    else:
        reply = ControlClient(args.socket).request("offload")
    doc = reply.get("offload")
    if not isinstance(doc, dict):
        raise ControlError("daemon sent an offload reply this oe cannot read")
    if args.json:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    try:
        text = render_offload(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ControlError(f"daemon sent an offload reply this oe cannot read ({exc})") from None
    out.write(text + "\n")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, out: TextIO) -> int:
    from oe_router.control.status import ReloadResult

    reply = ControlClient(args.socket).request("reload")
    try:
        result = ReloadResult.from_json(reply["reload"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"daemon sent a reload result this oe cannot read ({exc})") from None
    if result.accepted:
        out.write(f"reload accepted: config generation {result.generation} is active\n")
        return EXIT_OK
    for problem in result.problems:
        out.write(f"{problem}\n")
    out.write(
        f"reload refused: {len(result.problems)} problem(s); "
        f"config generation {result.generation} keeps running\n"
    )
    return EXIT_REFUSED


def cmd_up(args: argparse.Namespace, out: TextIO) -> int:
    """Ask the daemon for an IKE SA + first Child SA; wait until up or refused."""
    request: dict[str, Any] = {"peer": args.peer, "auth": args.auth, "mode": args.mode}
    if args.peer_key is not None:
        try:
            request["peer_key"] = Path(args.peer_key).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ControlError(
                f"--peer-key {args.peer_key}: {getattr(exc, 'strerror', exc)}"
            ) from None
    reply = ControlClient(args.socket, timeout=args.timeout).request("up", **request)
    row = reply.get("ike")
    if not isinstance(row, dict):
        raise ControlError("daemon sent an up reply this oe cannot read")
    from oe_router.control.status import TunnelStatus

    try:
        t = TunnelStatus.from_json(row)
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"daemon sent an up reply this oe cannot read ({exc})") from None
    child = t.children[0] if t.children else None
    out.write(
        f"{t.peer}: IKE SA up ({t.role}, {t.transform}, auth {t.local_auth}/{t.remote_auth})"
        + (f"; Child SA {child.spi_in}/{child.spi_out} {child.mode} {child.transform}"
           if child else "")
        + "\n"
    )  # fmt: skip
    return EXIT_OK


def cmd_down(args: argparse.Namespace, out: TextIO) -> int:
    reply = ControlClient(args.socket).request("down", peer=args.peer)
    out.write(f"{args.peer}: {reply.get('deleted', 0)} IKE SA(s) deleted\n")
    return EXIT_OK


def cmd_flush(args: argparse.Namespace, out: TextIO) -> int:
    reply = ControlClient(args.socket).request("flush")
    out.write(f"{reply.get('flushed', 0)} shunt(s) removed: the next flows negotiate again\n")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace, out: TextIO) -> int:
    """Every problem of the file, then (once it is valid) what the files its options name
    hold: a missing trust anchor or key is a problem, or a notice where the daemon makes
    it itself (filecheck.py). Exit 1 for problems only."""
    path = Path(args.file)
    config, problems = validate_file(path)
    notices: list[ConfigProblem] = []
    if config is not None:
        from oe_router.filecheck import check_files

        found = check_files(config, path)
        problems, notices = found.problems, found.notices
    for problem in problems:
        out.write(f"{problem}\n")
    for notice in notices:
        out.write(f"{dataclasses.replace(notice, message='notice: ' + notice.message)}\n")
    noted = f" ({len(notices)} notice(s))" if notices else ""
    if problems:
        out.write(f"{path}: {len(problems)} problem(s){noted}\n")
        return EXIT_REFUSED
    out.write(f"{path}: OK{noted}\n")
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace, out: TextIO) -> int:
    """The option table as JSON (kinds, limits, defaults): what LuCI's settings form checks
    values with (export_schema.py)."""
    from oe_router.config.export_schema import schema_doc

    out.write(json.dumps(schema_doc(), indent=2) + "\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oe", description="Control the oe-routerd daemon.")
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="control socket (default: control_socket of the config file, "
        f"else {DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"the daemon's config file, to find its socket (default {DEFAULT_CONFIG_PATH})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="show tunnels, shunts, engines and DNS")
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument(
        "--device",
        metavar="IP",
        help="one LAN device: its destinations, protected or clear, and why",
    )
    status.set_defaults(func=cmd_status)

    devices = sub.add_parser(
        "devices", help="LAN devices and their destinations (from conntrack and DHCP leases)"
    )
    devices.add_argument("--json", action="store_true", help="print the view as JSON")
    devices.set_defaults(func=cmd_devices, device=None)

    explain = sub.add_parser(
        "explain", help="which policy covers an address and what a new flow to it meets"
    )
    explain.add_argument("address", metavar="ADDRESS")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=cmd_explain)

    offload = sub.add_parser(
        "offload", help="crypto engines: drivers, proofs, speeds, what each is used for"
    )
    offload.add_argument(
        "action",
        nargs="?",
        choices=("bench",),
        help="bench: have the daemon measure every engine again, then show the table",
    )
    offload.add_argument("--json", action="store_true", help="print the document as JSON")
    offload.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long bench may take (default 300)",
    )
    offload.set_defaults(func=cmd_offload)

    reload = sub.add_parser("reload", help="ask the daemon to re-read its config")
    reload.set_defaults(func=cmd_reload)

    up = sub.add_parser("up", help="bring up an IKE SA and its first Child SA with a peer")
    up.add_argument("peer", metavar="ADDRESS|NAME")
    up.add_argument(
        "--auth",
        choices=COMMAND_ARGS["up"]["auth"].choices,
        default="null",
        help="how we authenticate: NULL (RFC 7619) or our key (RFC 7427)",
    )
    up.add_argument(
        "--peer-key",
        metavar="FILE",
        help="the peer's PEM public key (default: the peer must use NULL auth)",
    )
    up.add_argument("--mode", choices=COMMAND_ARGS["up"]["mode"].choices, default="tunnel")
    up.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the daemon (default 60)",
    )
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="delete the IKE SAs with a peer (telling it)")
    down.add_argument("peer", metavar="ADDRESS|NAME")
    down.set_defaults(func=cmd_down)

    flush = sub.add_parser("flush", help="remove every pass and drop shunt (negotiate again)")
    flush.set_defaults(func=cmd_flush)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file, print every problem")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG_PATH, metavar="FILE")
    check.set_defaults(func=cmd_config_check)
    schema = config_sub.add_parser(
        "schema", help="print every option with its kind, limits and default (JSON)"
    )
    schema.set_defaults(func=cmd_config_schema)
    return parser


def resolve_socket(explicit: Path | None, config_path: Path) -> Path:
    """--socket wins; else the daemon's config names it; else the built-in default.

    The config is read leniently (``control_socket_of``): a file halfway through an edit,
    with errors anywhere else, still gives the socket of the daemon running from it, so
    that `oe reload` reaches it and prints its problems.
    """
    if explicit is not None:
        return explicit
    return Path(control_socket_of(config_path) or DEFAULT_CONTROL_SOCKET)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "config":
        args.socket = resolve_socket(args.socket, args.config)
    try:
        rc: int = args.func(args, sys.stdout)
    except DaemonUnreachable as exc:
        print(f"oe: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"oe: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:
        return EXIT_OK
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
