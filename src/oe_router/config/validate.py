"""UCI model -> OeConfig, collecting every problem instead of stopping at the first.

The option tables below are the single statement of the UCI layout: section type, option
name, how its value parses and which dataclass field it fills.  docs/config.md and the
shipped files/etc/config/oe describe the same tables (a unit test checks they agree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar

from oe_router.records import record

from .problems import ConfigProblem
from .schema import (
    BOGUS_ACTIONS,
    DATAPATHS,
    DNS_MODES,
    ESP_PROPOSALS,
    KEYLESS_ACTIONS,
    LOG_LEVELS,
    POLICY_GROUPS,
    POLICY_LIMIT,
    BadValue,
    DnsConfig,
    IdentityConfig,
    IkeConfig,
    OeConfig,
    PolicyConfig,
    PolicyEntry,
    format_duration,
    parse_abs_path,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_endpoint,
    parse_ifname,
    parse_int,
    parse_local_id,
    parse_offload,
    parse_policy_entry,
    suggest,
)
from .uci import UciPackage, UciSection, UciSyntaxError, parse

__all__ = [
    "OPTIONS",
    "SECTION_TYPES",
    "ValueType",
    "option_location",
    "validate_package",
    "validate_text",
]

PACKAGE = "oe"
HOUR = 3600.0


@record(frozen=True)
class Opt:
    """One UCI option: its dataclass field, value parser and whether it is a list."""

    field: str
    parse: ValueType
    is_list: bool = False
    required: bool = False


class ValueType:
    """A value parser that also says what it accepts, as data (``meta``), so a client
    (LuCI's settings form, ``oe config schema``) can check values the same way before
    they reach the daemon. Calling it parses one UCI string or raises ``BadValue``."""

    kind: ClassVar[str]

    def __call__(self, text: str) -> Any:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """``{"kind": ..., <limits>}``: the JSON the schema export writes."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("meta", True):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@record(frozen=True)
class Duration(ValueType):
    """``parse_duration`` within [min, max] seconds."""

    min: float
    max: float
    kind = "duration"

    def __call__(self, text: str) -> float:
        return parse_duration(text, self.min, self.max)


@record(frozen=True)
class Int(ValueType):
    """``parse_int`` within [min, max]; ``suffix`` may follow the number (``100%``);
    ``gap``: a value other than 0 must also lie in [gap[0], gap[1]] (0 means off)."""

    min: int
    max: int
    suffix: str = ""
    gap: tuple[int, int] | None = None
    kind = "int"

    def __call__(self, text: str) -> int:
        t = text.strip()
        if self.suffix and t.endswith(self.suffix):
            t = t[: -len(self.suffix)]
        number = parse_int(t, self.min, self.max)
        if self.gap is not None and number != 0 and not self.gap[0] <= number <= self.gap[1]:
            lo, hi = self.gap
            raise BadValue(f"is out of range (allowed: 0 for off, or {lo} to {hi})")
        return number


@record(frozen=True)
class Choice(ValueType):
    """``parse_choice``: one of ``choices``, exactly."""

    choices: tuple[str, ...]
    kind = "choice"

    def __call__(self, text: str) -> str:
        return parse_choice(text, self.choices)


@record(frozen=True)
class AbsPath(ValueType):
    """``parse_abs_path`` of at most ``max_len`` bytes."""

    max_len: int = 4095
    kind = "abs_path"

    def __call__(self, text: str) -> str:
        return parse_abs_path(text, self.max_len)


@record(frozen=True)
class Named(ValueType):
    """A parser without limits of its own (``parse_bool``, ``parse_endpoint`` ...): the
    kind names its grammar, which a client implements once."""

    kind: str  # type: ignore[misc]  # a field here, a class constant in the others
    parse: Callable[[str], Any] = field(compare=False, metadata={"meta": False})

    def __call__(self, text: str) -> Any:
        return self.parse(text)


BOOL = Named("bool", parse_bool)
ENDPOINT = Named("endpoint", parse_endpoint)
IFNAME = Named("ifname", parse_ifname)
OFFLOAD = Named("offload", parse_offload)
POLICY_DEST = Named("policy_dest", parse_policy_entry)
LOCAL_ID = Named("local_id", parse_local_id)


def _dur(lo: float, hi: float) -> Duration:
    return Duration(lo, hi)


def _int(lo: int, hi: int) -> Int:
    return Int(lo, hi)


def _choice(*choices: str) -> Choice:
    return Choice(choices)


#: section type -> option name -> Opt.  Singleton sections map to OeConfig sub-objects.
OPTIONS: dict[str, dict[str, Opt]] = {
    "oe": {
        "enabled": Opt("enabled", BOOL),
        "log_level": Opt("log_level", _choice(*LOG_LEVELS)),
        "control_socket": Opt("control_socket", AbsPath(107)),
        "datapath": Opt("datapath", _choice(*DATAPATHS)),
        "offload": Opt("offload", OFFLOAD),
        "offload_canary": Opt("offload_canary", _dur(0.0, HOUR)),
        "offload_demote": Opt("offload_demote", BOOL),
        "shunt_lifetime": Opt("shunt_lifetime", _dur(1.0, 24 * HOUR)),
        "keep_private_on_stop": Opt("keep_private_on_stop", BOOL),
        "packet_hold": Opt("packet_hold", BOOL),
        "wan_interface": Opt("wan_interface", IFNAME, is_list=True),
        "lan_interface": Opt("lan_interface", IFNAME),
        "policy_limit": Opt("policy_limit", _int(1, 1_000_000)),
    },
    "dns": {
        "mode": Opt("mode", _choice(*DNS_MODES)),
        "listen": Opt("listen", ENDPOINT, is_list=True),
        "upstream": Opt("upstream", ENDPOINT, is_list=True),
        "resolv_file": Opt("resolv_file", AbsPath()),
        "hold_limit": Opt("hold_limit", _dur(0.0, 10.0)),
        "ttl_cap": Opt("ttl_cap", _dur(0.0, 24 * HOUR)),
        "trust_anchor": Opt("trust_anchor", AbsPath()),
        "auto_trust_anchor": Opt("auto_trust_anchor", AbsPath()),
        "bogus_action": Opt("bogus_action", _choice(*BOGUS_ACTIONS)),
        "keyless": Opt("keyless", _choice(*KEYLESS_ACTIONS)),
        "tcp_timeout": Opt("tcp_timeout", _dur(1.0, 300.0)),
        "doh_canary": Opt("doh_canary", BOOL),
    },
    "ike": {
        "ike_lifetime": Opt("ike_lifetime", _dur(60.0, 24 * HOUR)),
        "child_lifetime": Opt("child_lifetime", _dur(60.0, 24 * HOUR)),
        "rekey_margin": Opt("rekey_margin", _dur(0.0, 12 * HOUR)),
        "rekey_jitter": Opt("rekey_jitter", Int(0, 100, suffix="%")),
        "idle_timeout": Opt("idle_timeout", _dur(1.0, 24 * HOUR)),
        "retransmit_timeout": Opt("retransmit_timeout", _dur(0.1, 30.0)),
        "retransmit_tries": Opt("retransmit_tries", _int(1, 20)),
        "dpd_delay": Opt("dpd_delay", _dur(0.0, HOUR)),
        "half_open_limit": Opt("half_open_limit", _int(1, 65535)),
        "half_open_per_source": Opt("half_open_per_source", _int(1, 65535)),
        "half_open_per_prefix": Opt("half_open_per_prefix", _int(1, 65535)),
        "fragment_size": Opt("fragment_size", Int(0, 65535, gap=(576, 9000))),
        "cat": Opt("cat", BOOL),
        "esp_proposal": Opt("esp_proposals", _choice(*ESP_PROPOSALS), is_list=True),
    },
    "identity": {
        "local_id": Opt("local_id", LOCAL_ID),
        "private_key": Opt("private_key", AbsPath()),
    },
    "policy": {
        "group": Opt("group", _choice(*POLICY_GROUPS), required=True),
        "dest": Opt("dest", POLICY_DEST, is_list=True, required=True),
    },
}
SECTION_TYPES: tuple[str, ...] = tuple(OPTIONS)
#: Section types that may appear once, with the name the shipped file gives them.
SINGLETONS: dict[str, str] = {"oe": "global", "dns": "dns", "ike": "ike", "identity": "identity"}


class _Collector:
    """Problems of one file, and the helpers that word them."""

    def __init__(self, filename: str, package: str) -> None:
        self.filename = filename
        self.package = package
        self.problems: list[ConfigProblem] = []

    def add(self, line: int | None, option: str | None, value: str | None, message: str) -> None:
        self.problems.append(ConfigProblem(self.filename, line, option, value, message))

    def bad(self, line: int | None, option: str, value: str, reason: str) -> None:
        self.add(line, option, value, f"{value!r} {reason}")


def _labels(pkg: UciPackage, package: str) -> list[str]:
    """UCI paths of the sections: ``oe.dns`` or ``oe.@policy[2]`` for anonymous ones."""
    counts: dict[str, int] = {}
    out = []
    for sec in pkg.sections:
        index = counts.get(sec.type, 0)
        counts[sec.type] = index + 1
        out.append(f"{package}.{sec.name}" if sec.name else f"{package}.@{sec.type}[{index}]")
    return out


def _section_values(sec: UciSection, label: str, c: _Collector) -> dict[str, Any]:
    """Parse one known section's options; returns field -> value for the good ones."""
    spec = OPTIONS[sec.type]
    values: dict[str, Any] = {}
    for name, value in sec.options.items():
        path = f"{label}.{name}"
        line = sec.option_lines.get(name, sec.line)
        opt = spec.get(name)
        if opt is None:
            _unknown_option(sec.type, name, path, value, line, c)
            continue
        try:
            parsed = opt.parse(value)
        except BadValue as exc:
            c.bad(line, path, value, str(exc))
            continue
        values[opt.field] = (parsed,) if opt.is_list else parsed
    for name, items in sec.lists.items():
        path = f"{label}.{name}"
        lines = sec.list_lines.get(name, [])
        opt = spec.get(name)
        first_line = lines[0] if lines else sec.line
        if opt is None:
            _unknown_option(sec.type, name, path, items[0], first_line, c)
            continue
        if not opt.is_list:
            c.add(
                first_line,
                path,
                items[0],
                f"{items[0]!r} is given as a list, but {name} takes one value "
                f"(write 'option {name}', not 'list {name}')",
            )
            continue
        good = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            line = lines[i] if i < len(lines) else sec.line
            try:
                parsed = opt.parse(item)
            except BadValue as exc:
                c.bad(line, path, item, str(exc))
                continue
            key = str(parsed)
            if key in seen:
                c.bad(line, path, item, f"is listed twice (first at line {seen[key]})")
                continue
            seen[key] = line or 0
            good.append(parsed)
        values[opt.field] = tuple(good)
    for name, opt in spec.items():
        if opt.required and name not in sec.options and name not in sec.lists:
            verb = "list" if opt.is_list else "option"
            c.add(sec.line, f"{label}.{name}", None, f"is missing (add '{verb} {name} ...')")
    return values


def _unknown_option(
    stype: str, name: str, path: str, value: str, line: int | None, c: _Collector
) -> None:
    known = tuple(OPTIONS[stype])
    del value  # the name is the culprit, not the value
    c.add(
        line,
        path,
        None,
        f"unknown option {name!r} ({suggest(name, known)}"
        f"'{stype}' sections take: {', '.join(known)})",
    )


def validate_package(pkg: UciPackage, filename: str) -> tuple[OeConfig, list[ConfigProblem]]:
    """Typed config from a parsed file, and every problem found on the way.

    The config returned alongside problems holds defaults where values were bad; callers
    must not use it when the problem list is non-empty.
    """
    package = pkg.name or PACKAGE
    c = _Collector(filename, package)
    if pkg.name is not None and pkg.name != PACKAGE:
        c.add(pkg.package_line, None, pkg.name, f"package {pkg.name!r} is not {PACKAGE!r}")
    labels = _labels(pkg, package)

    first_of_type: dict[str, UciSection] = {}
    singles: dict[str, dict[str, Any]] = {t: {} for t in SINGLETONS}
    policy_sections: list[tuple[UciSection, str, dict[str, Any]]] = []
    for sec, label in zip(pkg.sections, labels, strict=True):
        for again in sec.reopened:  # the parser merged them, as libuci does
            c.add(
                again,
                label,
                None,
                f"section {sec.name!r} is defined twice (first at line {sec.line}); "
                "libuci would merge them, so write it once"
                if sec.name is not None
                else f"this names the unnamed section of line {sec.line} (by the name "
                "libuci makes up for it); give that section a name instead",
            )
        if sec.type not in OPTIONS:
            c.add(
                sec.line,
                label,
                sec.type,
                f"unknown section type {sec.type!r} ({suggest(sec.type, SECTION_TYPES)}"
                f"use one of: {', '.join(SECTION_TYPES)})",
            )
            continue
        values = _section_values(sec, label, c)
        if sec.type == "policy":
            policy_sections.append((sec, label, values))
            continue
        if sec.type in first_of_type:
            c.add(
                sec.line,
                label,
                None,
                f"only one '{sec.type}' section is allowed "
                f"(first at line {first_of_type[sec.type].line})",
            )
            continue
        first_of_type[sec.type] = sec
        singles[sec.type] = values

    policy = _policy(policy_sections, c)
    oe_sec = first_of_type.get("oe")
    limit_at = (
        (
            f"{labels[pkg.sections.index(oe_sec)]}.policy_limit",
            oe_sec.option_lines.get("policy_limit", oe_sec.line),
        )
        if oe_sec is not None
        else (f"{package}.global.policy_limit", None)
    )
    limit = singles["oe"].get("policy_limit", POLICY_LIMIT)
    _policy_limit(policy, limit, policy_sections, limit_at, c)
    try:
        config = OeConfig(
            **singles["oe"],
            dns=DnsConfig(**singles["dns"]),
            ike=IkeConfig(**singles["ike"]),
            identity=IdentityConfig(**singles["identity"]),
            policy=policy,
        )
    except TypeError as exc:  # a table/dataclass mismatch is a bug, not a user error
        raise AssertionError(f"option table out of step with schema: {exc}") from exc
    _cross_checks(config, first_of_type, labels, pkg, c)
    return config, sorted(c.problems, key=lambda p: p.line or 0)


def _policy(sections: list[tuple[UciSection, str, dict[str, Any]]], c: _Collector) -> PolicyConfig:
    """Gather dest entries per group; with no policy section at all, the defaults hold."""
    if not sections:
        return PolicyConfig()
    groups: dict[str, list[PolicyEntry]] = {g: [] for g in POLICY_GROUPS}
    owner: dict[PolicyEntry, tuple[str, str, int | None]] = {}
    for sec, label, values in sections:
        group = values.get("group")
        if group is None:
            continue
        if "dest" in sec.options:
            raw = [(sec.options["dest"], sec.option_lines.get("dest", sec.line))]
        else:
            raw = list(zip(sec.lists.get("dest", []), sec.list_lines.get("dest", []), strict=True))
        for text, line in raw:
            try:
                entry = parse_policy_entry(text)
            except BadValue:
                continue  # reported by _section_values
            if entry in owner:
                other_group, other_label, other_line = owner[entry]
                if other_label == label:
                    continue  # a repeat inside one section, reported by _section_values
                where = f"{other_label}, line {other_line}"
                reason = (
                    f"is listed twice in group {group!r} (also {where})"
                    if other_group == group
                    else f"is already in group {other_group!r} ({where}); "
                    "a destination belongs to one group"
                )
                c.bad(line, f"{label}.dest", text, reason)
                continue
            owner[entry] = (group, label, line)
            groups[group].append(entry)
    return PolicyConfig(**{g.replace("-", "_"): tuple(v) for g, v in groups.items()})


def _policy_limit(
    policy: PolicyConfig,
    limit: int,
    sections: list[tuple[UciSection, str, dict[str, Any]]],
    where: tuple[str, int | None],
    c: _Collector,
) -> None:
    """More destinations than ``policy_limit``: one problem, at the first one too many
    (``where``: the policy_limit option's path and line, for the built-in defaults).

    Why a bound: every destination becomes up to three kernel XFRM policies (about 1 KiB
    each) and some 2.4 KB in the daemon, every ACQUIRE and DNS answer scans them, and
    the file is validated again at each reload; 50,000 of them do not fit a 128 MB router.
    """
    total = sum(len(entries) for entries in policy.groups().values())
    if total <= limit:
        return
    seen = 0
    for sec, label, values in sections:
        dests = values.get("dest", ())
        if seen + len(dests) > limit:
            lines: list[int | None] = [*sec.list_lines.get("dest", [])] or [
                sec.option_lines.get("dest", sec.line)
            ]
            c.bad(
                lines[min(limit - seen, len(lines) - 1)],
                f"{label}.dest",
                str(dests[limit - seen]),
                f"is policy destination {limit + 1} of {total}, over the limit of {limit} "
                "(oe.global.policy_limit): each becomes up to 3 kernel policies (about 1 KiB "
                "each) and takes about 2.4 KB in the daemon; use broader prefixes, or raise "
                "policy_limit if the router has the memory",
            )
            return
        seen += len(dests)
    c.bad(
        where[1],
        where[0],
        str(limit),
        f"is less than the {total} built-in policy destinations (the file has no "
        "'config policy' section)",
    )


def _cross_checks(
    config: OeConfig,
    first_of_type: dict[str, UciSection],
    labels: list[str],
    pkg: UciPackage,
    c: _Collector,
) -> None:
    """Rules that tie options together."""
    ike_sec = first_of_type.get("ike")
    if ike_sec is None:
        return
    ike = config.ike
    label = labels[pkg.sections.index(ike_sec)]
    worst = ike.rekey_margin * (1 + ike.rekey_jitter / 100)
    shortest = min(ike.ike_lifetime, ike.child_lifetime)
    if worst >= shortest:
        name = "rekey_margin" if "rekey_margin" in ike_sec.options else "child_lifetime"
        raw = ike_sec.options.get(name, format_duration(getattr(ike, name)))
        c.bad(
            ike_sec.option_lines.get(name, ike_sec.line),
            f"{label}.{name}",
            raw,
            f"leaves no time before rekeying: rekey_margin plus {ike.rekey_jitter}% jitter "
            f"({format_duration(worst)}) must be shorter than the shortest lifetime "
            f"({format_duration(shortest)})",
        )


def option_location(pkg: UciPackage, stype: str, name: str) -> tuple[str, int | None]:
    """The UCI path (``oe.dns.trust_anchor``) and line of option ``name`` in the first
    section of type ``stype``: where a problem with its value is shown. An option left
    at its default points at its section's line, or at no line without a section."""
    package = pkg.name or PACKAGE
    for sec, label in zip(pkg.sections, _labels(pkg, package), strict=True):
        if sec.type == stype:
            return f"{label}.{name}", sec.option_lines.get(name, sec.line)
    return f"{package}.{SINGLETONS.get(stype, stype)}.{name}", None


def validate_text(text: str, filename: str) -> tuple[OeConfig | None, list[ConfigProblem]]:
    """Parse and validate UCI text; a syntax error is a problem with a column."""
    try:
        pkg = parse(text, filename)
    except UciSyntaxError as exc:
        return None, [ConfigProblem(filename, exc.line, None, None, exc.reason, exc.column)]
    config, problems = validate_package(pkg, filename)
    return (None if problems else config), problems


def defaults_as_dict() -> dict[str, Any]:
    """The default of every UCI option, by section type, for docs and tests."""
    cfg = OeConfig()
    objs: dict[str, Any] = {"oe": cfg, "dns": cfg.dns, "ike": cfg.ike, "identity": cfg.identity}
    out: dict[str, Any] = {}
    for stype, obj in objs.items():
        fields = {f.name for f in dataclasses.fields(obj)}
        out[stype] = {
            n: getattr(obj, o.field) for n, o in OPTIONS[stype].items() if o.field in fields
        }
    return out
