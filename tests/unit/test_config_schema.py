"""Schema defaults, the shipped /etc/config/oe, value parsing and problem collection."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest

from oe_router.config import (
    DEFAULT_CONFIG_PATH,
    ConfigInvalid,
    ConfigProblem,
    OeConfig,
    check_config,
    load_config,
    parse_config,
)
from oe_router.config.schema import (
    BadValue,
    Endpoint,
    PolicyEntry,
    format_duration,
    parse_duration,
    parse_endpoint,
    parse_policy_entry,
)
from oe_router.config.validate import OPTIONS, defaults_as_dict

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "files" / "etc" / "config" / "oe"
DOCS = ROOT / "docs" / "config.md"
GOOD = Path(__file__).parent / "configs" / "good"


def test_defaults_a_user_relies_on() -> None:
    cfg = OeConfig()
    assert DEFAULT_CONFIG_PATH == "/etc/config/oe"
    assert cfg.enabled is True
    assert cfg.log_level == "info"
    assert cfg.control_socket == "/var/run/oe/control.sock"
    assert cfg.datapath == "auto"
    assert cfg.offload == "auto"
    assert cfg.shunt_lifetime == 15 * 60
    assert cfg.keep_private_on_stop is True and cfg.packet_hold is True
    assert (cfg.wan_interface, cfg.lan_interface) == (("wan", "wan6"), "lan")  # networks
    assert cfg.dns.hold_limit == 3.0
    assert cfg.dns.bogus_action == "servfail"
    assert cfg.dns.mode == "dnsmasq"  # the package puts the front behind dnsmasq
    assert cfg.identity.local_id == "%null"
    groups = cfg.policy.groups()
    assert [str(e) for e in groups["private-or-clear"]] == ["0.0.0.0/0", "::/0"]
    clear = {e.network for e in groups["clear"]}
    for special in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
        "::1/128",
    ):
        assert ipaddress.ip_network(special) in clear
    assert groups["private"] == groups["block"] == groups["clear-or-private"] == ()


def test_empty_file_is_the_defaults() -> None:
    assert parse_config("") == OeConfig()
    assert parse_config("# nothing but a comment\n\n") == OeConfig()


def test_shipped_config_parses_and_equals_defaults() -> None:
    assert check_config(SHIPPED) == []
    assert load_config(SHIPPED) == OeConfig()


def test_shipped_config_shows_every_option() -> None:
    text = SHIPPED.read_text()
    for stype, options in OPTIONS.items():
        for name in options:
            assert re.search(rf"^\s*#?\s*(option|list) {name} ", text, re.M), (stype, name)


def test_docs_describe_every_option_with_its_default() -> None:
    text = DOCS.read_text()
    defaults = defaults_as_dict()
    for stype, options in OPTIONS.items():
        assert f"config {stype}" in text, stype
        for name in options:
            assert f"`{name}`" in text, f"docs/config.md misses {stype}.{name}"
    assert "`/var/run/oe/control.sock`" in text
    assert defaults["dns"]["hold_limit"] == 3.0


def test_to_dict_is_json_safe_and_complete() -> None:
    d = OeConfig().to_dict()
    back = json.loads(json.dumps(d))
    assert back == d
    assert d["control_socket"] == "/var/run/oe/control.sock"
    assert d["dns"]["listen"] == ["127.0.0.1:5335", "[::1]:5335"]  # type: ignore[index]
    assert d["policy"]["private-or-clear"] == ["0.0.0.0/0", "::/0"]  # type: ignore[index]


def test_every_good_fixture_loads() -> None:
    for path in sorted(GOOD.glob("*.conf")):
        assert check_config(path) == [], path.name


def test_everything_fixture_sets_every_field() -> None:
    cfg = load_config(GOOD / "everything.conf")
    assert cfg.enabled is False and cfg.log_level == "debug"
    assert cfg.control_socket == "/tmp/oe.sock"
    assert cfg.datapath == "userspace" and cfg.offload == "virtio_crypto_aes_cbc"
    assert cfg.offload_canary == 2.0 and cfg.offload_demote is True
    assert OeConfig().ike.esp_proposals == ()  # not set: offload orders the default offer
    assert cfg.shunt_lifetime == 90 and cfg.keep_private_on_stop is False
    assert cfg.packet_hold is False
    assert (cfg.wan_interface, cfg.lan_interface) == (("eth0.2",), "br-lan")
    assert cfg.dns.listen == (Endpoint("0.0.0.0", 53), Endpoint("::", 53))
    assert cfg.dns.upstream == (Endpoint("192.0.2.53", 53),)
    assert cfg.dns.hold_limit == 0 and cfg.dns.ttl_cap == 0
    assert cfg.dns.bogus_action == "insecure"
    assert cfg.dns.mode == "manual"
    assert cfg.ike.ike_lifetime == 86400 and cfg.ike.child_lifetime == 7200
    assert cfg.ike.rekey_margin == 300 and cfg.ike.rekey_jitter == 0
    assert cfg.ike.idle_timeout == 90
    assert cfg.ike.retransmit_timeout == 1.5 and cfg.ike.retransmit_tries == 20
    assert cfg.ike.dpd_delay == 0 and cfg.ike.half_open_limit == 1000
    assert cfg.ike.fragment_size == 0 and cfg.ike.esp_proposals == ("chacha20poly1305",)
    assert cfg.ike.cat is False and OeConfig().ike.cat is True
    assert cfg.identity.local_id == "@router.example.org"
    assert cfg.identity.private_key == "/etc/oe/router.pem"
    p = cfg.policy
    assert [str(e) for e in p.private] == [
        "192.0.2.0/24 tcp 443",
        "2001:db8::/32 udp 4500",
        "198.51.100.7/32",
    ]
    assert [str(e) for e in p.block] == ["203.0.113.0/24 47"]
    # Writing any policy section replaces the built-in groups.
    assert p.private_or_clear == () and p.clear == ()


def test_upstream_without_port_means_53() -> None:
    cfg = load_config(GOOD / "upstream_without_port.conf")
    assert [str(u) for u in cfg.dns.upstream] == [
        "192.0.2.53:53",
        "[2001:db8::53]:53",
        "[2001:db8::54]:5353",
    ]


def test_short_forms_and_anonymous_sections() -> None:
    cfg = load_config(GOOD / "minimal_anonymous.conf")
    assert cfg.enabled is False
    assert cfg.dns.hold_limit == 1.5


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("15m", 900),
        ("8h", 28800),
        (" 3 s ", 3),
        (".5s", 0.5),
        ("0", 0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, 0, 86400) == seconds


@pytest.mark.parametrize("text", ["", "3 parsecs", "1d", "h", "1h30m", "1e3", "--1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(BadValue, match="is not a duration"):
        parse_duration(text, 0, 86400)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.5, 3, 90, 900, 28800, 1.25)] == [
        "0s",
        "500ms",
        "3s",
        "90s",
        "15m",
        "8h",
        "1250ms",
    ]


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("192.0.2.0/24", PolicyEntry(ipaddress.ip_network("192.0.2.0/24"))),
        ("192.0.2.1", PolicyEntry(ipaddress.ip_network("192.0.2.1/32"))),
        ("2001:db8::/32 tcp 443", PolicyEntry(ipaddress.ip_network("2001:db8::/32"), 6, 443)),
        ("0.0.0.0/0 UDP 53", PolicyEntry(ipaddress.ip_network("0.0.0.0/0"), 17, 53)),
        ("0.0.0.0/0 132 9899", PolicyEntry(ipaddress.ip_network("0.0.0.0/0"), 132, 9899)),
        ("::/0 icmpv6", PolicyEntry(ipaddress.ip_network("::/0"), 58)),
        ("10.0.0.0/8 esp", PolicyEntry(ipaddress.ip_network("10.0.0.0/8"), 50)),
    ],
)
def test_policy_entries(text: str, entry: PolicyEntry) -> None:
    assert parse_policy_entry(text) == entry


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.0/8 gre 80", "ports need tcp, udp or sctp"),
        ("10.0.0.0/8 tcp 0", "bad port"),
        ("10.0.0.0/8 tcp 65536", "bad port"),
        ("10.0.0.0/8 tcp 80 extra", "is not 'CIDR [proto [port]]'"),
        ("10.0.0.0/8 256", "unknown protocol"),
        ("example.org", "no valid CIDR"),
        ("10.0.0.0/8 icmpv6", "use icmp"),
    ],
)
def test_bad_policy_entries(text: str, reason: str) -> None:
    with pytest.raises(BadValue, match=re.escape(reason)):
        parse_policy_entry(text)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:5335", Endpoint("127.0.0.1", 5335)),
        ("[::1]:5335", Endpoint("::1", 5335)),
        ("::1", Endpoint("::1", 53)),
        ("[2001:DB8::1]", Endpoint("2001:db8::1", 53)),
        ("192.0.2.1", Endpoint("192.0.2.1", 53)),
    ],
)
def test_endpoints(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint


@pytest.mark.parametrize(
    "text", ["[192.0.2.1]:53", "[::1]x", "[::1", "1.2.3.4:", "host:53", "1.2.3.4:0", "[::1]:"]
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(BadValue):
        parse_endpoint(text)


def test_all_problems_are_collected_in_line_order() -> None:
    text = (
        "config oe 'global'\n"
        "\toption log_level 'loud'\n"
        "\toption datapth 'kernel'\n"
        "config dns 'dns'\n"
        "\toption hold_limit '3 parsecs'\n"
        "\tlist listen 'nowhere'\n"
        "config policy\n"
        "\toption group 'private'\n"
        "\tlist dest '10.0.0.0/8 icmp 1'\n"
        "\tlist dest '10.1.0.0/16'\n"
        "\tlist dest '10.1.0.0/16'\n"
        "config frobnicate\n"
    )
    with pytest.raises(ConfigInvalid) as info:
        parse_config(text, "/etc/config/oe")
    problems = info.value.problems
    assert [(p.line, p.option) for p in problems] == [
        (2, "oe.global.log_level"),
        (3, "oe.global.datapth"),
        (5, "oe.dns.hold_limit"),
        (6, "oe.dns.listen"),
        (9, "oe.@policy[0].dest"),
        (11, "oe.@policy[0].dest"),
        (12, "oe.@frobnicate[0]"),
    ]
    assert "did you mean 'datapath'?" in problems[1].message
    assert "is listed twice (first at line 10)" in problems[5].message
    assert str(info.value).splitlines() == [str(p) for p in problems]
    assert all(p.file == "/etc/config/oe" for p in problems)


def test_problem_str_is_one_line() -> None:
    p = ConfigProblem(
        "/etc/config/oe",
        14,
        "oe.dns.hold_limit",
        "3 parsecs",
        "'3 parsecs' is not a duration (use e.g. 3s, 500ms)",
    )
    assert str(p) == (
        "/etc/config/oe:14: oe.dns.hold_limit: '3 parsecs' is not a duration (use e.g. 3s, 500ms)"
    )
    multi = parse_config_problems("config dns 'dns'\n\toption trust_anchor 'a\nb'\n")
    assert len(multi) == 1 and "\n" not in str(multi[0])
    assert str(multi[0]).endswith(
        "oe.dns.trust_anchor: 'a\\nb' is not an absolute path (start it with /)"
    )


def parse_config_problems(text: str) -> list[ConfigProblem]:
    try:
        parse_config(text, "f")
    except ConfigInvalid as exc:
        return exc.problems
    return []


def test_syntax_error_is_a_problem_with_column() -> None:
    (p,) = parse_config_problems("config oe 'global'\n\toption enabled \"1\n")
    assert (p.line, p.column, p.option) == (2, 17, None)
    assert str(p) == 'f:2:17: unterminated " quote'


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    (p,) = check_config(missing)
    assert str(p) == f"{missing}: cannot read the file: No such file or directory"
    with pytest.raises(ConfigInvalid):
        load_config(missing)


def test_directory_is_a_problem(tmp_path: Path) -> None:
    (p,) = check_config(tmp_path)
    assert str(p) == f"{tmp_path}: cannot read the file: Is a directory"


def test_non_utf8_file_is_a_problem_with_column(tmp_path: Path) -> None:
    f = tmp_path / "oe"
    f.write_bytes(b"config oe 'global'\n\toption log_level '\xff'\n")
    (p,) = check_config(f)
    assert str(p) == f"{f}:2:20: is not UTF-8 text (byte 0xff)"


def test_config_objects_are_frozen() -> None:
    cfg = OeConfig()
    with pytest.raises(AttributeError):
        cfg.enabled = False  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.dns.hold_limit = 1  # type: ignore[misc]
