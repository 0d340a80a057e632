"""Typed, frozen settings for /etc/config/oe, with the defaults a router ships with.

Every field has a default, so ``OeConfig()`` is the configuration of an empty file.
Durations are floats in seconds.  The value parsers at the bottom turn one UCI string
into one typed value or raise ``BadValue`` with a reason that says what is allowed; the
mapping from UCI sections and options to these classes lives in ``validate.py``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import field
from typing import Literal

from oe_router.records import record

__all__ = [
    "BOGUS_ACTIONS",
    "DATAPATHS",
    "DEFAULT_CLEAR",
    "DEFAULT_ESP_PROPOSALS",
    "DEFAULT_PRIVATE_OR_CLEAR",
    "DNS_MODES",
    "ESP_PROPOSALS",
    "KEYLESS_ACTIONS",
    "LOG_LEVELS",
    "POLICY_GROUPS",
    "POLICY_LIMIT",
    "PORT_PROTOCOLS",
    "PROTOCOLS",
    "BadValue",
    "DnsConfig",
    "Endpoint",
    "IdentityConfig",
    "IkeConfig",
    "OeConfig",
    "PolicyConfig",
    "PolicyEntry",
    "format_duration",
    "parse_bool",
    "parse_duration",
    "parse_endpoint",
    "parse_local_id",
    "parse_policy_entry",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LogLevel = Literal["debug", "info", "notice", "warning", "error"]
Datapath = Literal["auto", "kernel", "userspace"]
BogusAction = Literal["servfail", "insecure"]
DnsMode = Literal["dnsmasq", "manual"]
KeylessAction = Literal["pass", "probe"]

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "notice", "warning", "error")
DATAPATHS: tuple[str, ...] = ("auto", "kernel", "userspace")
BOGUS_ACTIONS: tuple[str, ...] = ("servfail", "insecure")
DNS_MODES: tuple[str, ...] = ("dnsmasq", "manual")
KEYLESS_ACTIONS: tuple[str, ...] = ("pass", "probe")
POLICY_GROUPS: tuple[str, ...] = (
    "private",
    "private-or-clear",
    "clear-or-private",
    "clear",
    "block",
)
#: ESP proposal names the IKE layer knows, strongSwan-style keywords.
ESP_PROPOSALS: tuple[str, ...] = (
    "aes256gcm16",
    "aes128gcm16",
    "chacha20poly1305",
    "aes256-sha256",
    "aes128-sha256",
    "aes256-sha512",
    "aes256-sha384",
    "aes128-sha512",
    "aes128-sha384",
)

#: The ESP offer when ``esp_proposal`` is not set, before offload reorders it: the AEADs
#: first, then AES-CBC with HMAC-SHA2 (RFC 4868; SHA-384/512 for peers such as OpenIKED
#: whose default Child SA offer has no SHA-256). No SHA-1: docs/config.md says why.
DEFAULT_ESP_PROPOSALS: tuple[str, ...] = (
    "aes256gcm16",
    "aes128gcm16",
    "chacha20poly1305",
    "aes256-sha256",
    "aes128-sha256",
    "aes256-sha512",
    "aes256-sha384",
    "aes128-sha512",
    "aes128-sha384",
)

#: IP protocol names accepted in policy entries (IANA numbers).
PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
}
_PROTO_NAMES: dict[int, str] = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}
#: Protocols whose policy entries may name a port (tcp, udp, sctp).
PORT_PROTOCOLS: tuple[int, ...] = (6, 17, 132)


class BadValue(ValueError):
    """A value that does not parse; the text says what is allowed (no value in it)."""


# --------------------------------------------------------------------------- value types


@record(frozen=True)
class Endpoint:
    """An IP address and UDP/TCP port; str() is ``1.2.3.4:53`` or ``[2001:db8::1]:53``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        """4 or 6."""
        return 6 if ":" in self.host else 4


@record(frozen=True)
class PolicyEntry:
    """A destination of a policy group: network, optional IP protocol, optional port.

    ``icmp_type`` narrows an icmp/icmpv6 entry to one message type. Only the built-in
    exclusions use it (neighbour discovery); UCI has no syntax for it.
    """

    network: IPNetwork
    proto: int | None = None
    port: int | None = None
    icmp_type: int | None = None

    def __str__(self) -> str:
        parts = [str(self.network)]
        if self.proto is not None:
            parts.append(_PROTO_NAMES.get(self.proto, str(self.proto)))
        if self.port is not None:
            parts.append(str(self.port))
        if self.icmp_type is not None:
            parts.append(f"type {self.icmp_type}")
        return " ".join(parts)


def _nets(*cidrs: str) -> tuple[PolicyEntry, ...]:
    return tuple(PolicyEntry(ipaddress.ip_network(c)) for c in cidrs)


#: libreswan's recommended OE default: try IPsec with everyone, fall back to clear.
DEFAULT_PRIVATE_OR_CLEAR: tuple[PolicyEntry, ...] = _nets("0.0.0.0/0", "::/0")
#: Never try IPsec with private, local or special-purpose ranges.
DEFAULT_CLEAR: tuple[PolicyEntry, ...] = _nets(
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 CGNAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "224.0.0.0/4",  # multicast
    "::1/128",  # loopback
    "fc00::/7",  # RFC 4193 ULA
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)


# --------------------------------------------------------------------------- sections


@record(frozen=True)
class DnsConfig:
    """``config dns 'dns'``: the DNS front that holds answers until a tunnel is up."""

    #: How LAN queries reach the front. "dnsmasq": while the front runs, the daemon
    #: redirects the router's outgoing DNS (dnsmasq's forwards) to it (dns/capture.py);
    #: "manual": no redirect, the resolver set-up is the user's.
    mode: DnsMode = "dnsmasq"
    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 5335), Endpoint("::1", 5335))
    #: Empty: take the resolvers from ``resolv_file`` (OpenWrt's WAN DNS servers).
    upstream: tuple[Endpoint, ...] = ()
    resolv_file: str = "/tmp/resolv.conf.d/resolv.conf.auto"
    hold_limit: float = 3.0
    ttl_cap: float = 300.0
    #: A fixed anchor file (DS/DNSKEY records), used as is. Empty (not set): the managed
    #: anchors of ``auto_trust_anchor``.
    trust_anchor: str = ""
    #: The root's trust anchors kept current by RFC 5011, seeded from the IANA anchors
    #: shipped with the package.
    auto_trust_anchor: str = "/etc/oe/root.anchors"
    bogus_action: BogusAction = "servfail"
    #: A name proven keyless (secure denial of IPSECKEY, or an unsigned zone) whose
    #: addresses are private-or-clear: "pass" shunts them in the clear for the answer's
    #: TTL before the answer goes out; "probe" leaves them to the trap, so the first
    #: packet waits for an IKE probe (up to ~3 s for a host that drops UDP 500).
    keyless: KeylessAction = "pass"
    #: A TCP client gets this long to send each query and to read each reply.
    tcp_timeout: float = 10.0
    #: Answer Mozilla's DoH canary domain (use-application-dns.net) NXDOMAIN, so
    #: Firefox's default DNS over HTTPS stands down and its queries reach the front.
    doh_canary: bool = True


@record(frozen=True)
class IkeConfig:
    """``config ike 'ike'``: IKEv2 timers and limits (libreswan-like defaults)."""

    ike_lifetime: float = 8 * 3600.0
    child_lifetime: float = 3600.0
    rekey_margin: float = 540.0
    #: Percent of ``rekey_margin`` added at random, so both ends do not rekey at once.
    rekey_jitter: int = 100
    #: A Child SA that carried no traffic for this long is deleted (never rekeyed);
    #: the next packet to the peer negotiates again.
    idle_timeout: float = 300.0
    #: Sends of a request: 0.4 + 0.8 + 1.6 = 2.8 s to give up on a silent peer, before a
    #: trapped TCP flow's third SYN (t = 3 s), so it meets the pass shunt (docs/oe-gateway.md).
    retransmit_timeout: float = 0.4
    retransmit_tries: int = 3
    #: 0 turns liveness checks off.
    dpd_delay: float = 30.0
    half_open_limit: int = 64
    #: RFC 8019: half-open IKE SAs one address (that answered a COOKIE) may hold ...
    half_open_per_source: int = 4
    #: ... and one /24 (IPv4) or /64 (IPv6) of peers without an IKE SA with us.
    half_open_per_prefix: int = 8
    #: 0 turns IKE fragmentation (RFC 7383) off.
    fragment_size: int = 1280
    #: Ask OE peers for an inner address (CP) and translate LAN flows to it (CAT).
    cat: bool = True
    #: Empty (not set): ``DEFAULT_ESP_PROPOSALS``, which ``offload auto`` reorders so that
    #: the transform the fastest verified engine runs comes first. Set: exactly this.
    esp_proposals: tuple[str, ...] = ()


@record(frozen=True)
class IdentityConfig:
    """``config identity 'identity'``: who the router says it is in IKE_AUTH."""

    #: ``%null`` (RFC 7619 NULL auth), ``@fqdn`` or an IP address.
    local_id: str = "%null"
    private_key: str = "/etc/oe/private.pem"


@record(frozen=True)
class PolicyConfig:
    """``config policy`` sections, gathered per group (libreswan's policy groups)."""

    private: tuple[PolicyEntry, ...] = ()
    private_or_clear: tuple[PolicyEntry, ...] = DEFAULT_PRIVATE_OR_CLEAR
    clear_or_private: tuple[PolicyEntry, ...] = ()
    clear: tuple[PolicyEntry, ...] = DEFAULT_CLEAR
    block: tuple[PolicyEntry, ...] = ()

    def groups(self) -> dict[str, tuple[PolicyEntry, ...]]:
        """Entries keyed by the group's UCI name (``private-or-clear`` ...)."""
        return {g: getattr(self, g.replace("-", "_")) for g in POLICY_GROUPS}


#: The default of ``oe.global.policy_limit``: about 6 MB of a 128 MB router at most.
POLICY_LIMIT = 1024


@record(frozen=True)
class OeConfig:
    """The whole of /etc/config/oe, typed; ``OeConfig()`` is the built-in default."""

    enabled: bool = True
    log_level: LogLevel = "info"
    control_socket: str = "/var/run/oe/control.sock"
    datapath: Datapath = "auto"
    #: ``auto``, ``off`` or a crypto engine (driver) name.
    offload: str = "auto"
    #: Re-run a known-answer test on every engine in use this often (0: never).
    offload_canary: float = 10.0
    #: Lower the kernel's priority of a crypto driver that fails its known-answer test
    #: (NETLINK_CRYPTO), so the kernel's own ESP moves to the next implementation.
    offload_demote: bool = False
    shunt_lifetime: float = 900.0
    #: Keep the ``private`` group's drop policies installed when the daemon stops.
    keep_private_on_stop: bool = True
    #: Kernel datapath: hold a LAN flow's first packets (NFQUEUE, before source NAT) until
    #: its SA or shunt is in, instead of losing them (datapath/kernel_hold.py).
    packet_hold: bool = True
    #: OpenWrt networks (or, failing that, devices; ``netnames``): IKE and the tunnels use
    #: the WAN networks' addresses (``wan6`` as well: a list); the LAN's prefixes never go
    #: into tunnels.
    wan_interface: tuple[str, ...] = ("wan", "wan6")
    lan_interface: str = "lan"
    #: Most policy destinations (``dest`` entries of all policy groups) the file may hold:
    #: each becomes up to three kernel XFRM policies of about 1 KiB, plus about 2.4 KB in
    #: the daemon, and every lookup scans them (docs/config.md, "Limits").
    policy_limit: int = POLICY_LIMIT
    dns: DnsConfig = field(default_factory=DnsConfig)
    ike: IkeConfig = field(default_factory=IkeConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe nested dict (addresses and entries as strings) for the status model."""
        out = _to_json(self)
        assert isinstance(out, dict)
        return out


def _to_json(value: object) -> object:
    if isinstance(value, PolicyConfig):
        return {g: [str(e) for e in entries] for g, entries in value.groups().items()}
    if isinstance(value, Endpoint | PolicyEntry):
        return str(value)
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _to_json(getattr(value, k)) for k in value.__dataclass_fields__}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --------------------------------------------------------------------------- value parsers

_TRUE = ("1", "yes", "on", "true", "enabled")
_FALSE = ("0", "no", "off", "false", "disabled")


def parse_bool(text: str) -> bool:
    """UCI booleans, as OpenWrt's config_get_bool reads them."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BadValue("is not a boolean (use 1 or 0)")


_DURATION_RE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def format_duration(seconds: float) -> str:
    """Shortest exact spelling: 0.5 -> 500ms, 900 -> 15m, 28800 -> 8h, 90 -> 90s."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    ms = seconds * 1000
    return f"{int(ms)}ms" if ms == int(ms) else f"{seconds:g}s"


def parse_duration(text: str, lo: float, hi: float) -> float:
    """Seconds from ``90``, ``1.5s``, ``500ms``, ``15m``, ``8h``; within [lo, hi]."""
    m = _DURATION_RE.fullmatch(text.strip())
    allowed = f"allowed: {format_duration(lo)} to {format_duration(hi)}"
    if m is None:
        raise BadValue(f"is not a duration (use e.g. 3s, 500ms, 15m, 8h; {allowed})")
    seconds = float(m.group(2)) * _UNIT[m.group(3)]
    if m.group(1) == "-" and seconds != 0:
        raise BadValue(f"is negative ({allowed})")
    if not lo <= seconds <= hi:
        raise BadValue(f"is out of range ({allowed})")
    return seconds


def parse_int(text: str, lo: int, hi: int) -> int:
    """A decimal integer within [lo, hi]."""
    try:
        number = int(text.strip(), 10)
    except ValueError:
        raise BadValue(f"is not a whole number (allowed: {lo} to {hi})") from None
    if not lo <= number <= hi:
        raise BadValue(f"is out of range (allowed: {lo} to {hi})")
    return number


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    """One of a fixed set of words."""
    if text not in choices:
        raise BadValue(f"is not allowed ({suggest(text, choices)}use one of: {', '.join(choices)})")
    return text


def suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """``"did you mean 'x'?; "`` for the closest choice (difflib), else empty.

    difflib is imported here: only a config error needs it, and it costs the daemon
    ~170 KB for its life when imported at start (docs/footprint.md)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?; " if close else ""


def parse_abs_path(text: str, max_len: int = 4095) -> str:
    """An absolute file path (unix socket paths must fit sun_path: 107 bytes)."""
    if not text.startswith("/"):
        raise BadValue("is not an absolute path (start it with /)")
    if len(text.encode()) > max_len:
        raise BadValue(f"is too long (at most {max_len} bytes)")
    if any(c.isspace() and c != " " for c in text):
        raise BadValue("contains a control character")
    return text


_ENGINE_RE = re.compile(r"[A-Za-z0-9_.():,-]{1,96}")


def parse_offload(text: str) -> str:
    """``auto``, ``off``, an engine (``afalg``, ``cryptodev:<driver>``) or a crypto driver
    name as /proc/crypto spells it."""
    if text in ("auto", "off") or _ENGINE_RE.fullmatch(text):
        return text
    raise BadValue(
        "is not auto, off or an engine name (e.g. virtio_crypto_aes_cbc, afalg, cryptodev)"
    )


_IFNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")


def parse_ifname(text: str) -> str:
    """An OpenWrt network name (``wan``) or a Linux device name (IFNAMSIZ: at most 15
    bytes, e.g. ``eth0.2``, ``br-lan``)."""
    if _IFNAME_RE.fullmatch(text) and text not in (".", ".."):
        return text
    raise BadValue(
        "is not a network or device name (1-15 of A-Z a-z 0-9 _ . @ -, e.g. wan or eth0.2)"
    )


def parse_endpoint(text: str, default_port: int = 53) -> Endpoint:
    """``1.2.3.4``, ``1.2.3.4:53``, ``2001:db8::1``, ``[2001:db8::1]:53``; IPs only."""
    hint = "use IP:port or [IPv6]:port, e.g. 127.0.0.1:53 or [::1]:53"
    s = text.strip()
    host, port_text = s, None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise BadValue(f"has an unclosed [ ({hint})")
        host, rest = s[1:end], s[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise BadValue(f"is not an address ({hint})")
            port_text = rest[1:]
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise BadValue(f"is not an IP address with optional port ({hint})") from None
    if s.startswith("[") and addr.version != 6:
        raise BadValue(f"puts an IPv4 address in [] ({hint})")
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise BadValue(f"has a bad port (1 to 65535; {hint})")
        port = int(port_text)
    return Endpoint(addr.compressed, port)


def parse_policy_entry(text: str) -> PolicyEntry:
    """``CIDR [proto [port]]``: proto by name or number, port only for tcp/udp/sctp."""
    words = text.split()
    if not 1 <= len(words) <= 3:
        raise BadValue("is not 'CIDR [proto [port]]' (e.g. 192.0.2.0/24 tcp 443)")
    try:
        net = ipaddress.ip_network(words[0])
    except ValueError:
        try:
            loose = ipaddress.ip_network(words[0], strict=False)
        except ValueError:
            raise BadValue("has no valid CIDR (e.g. 192.0.2.0/24 or 2001:db8::/32)") from None
        raise BadValue(f"has host bits set (did you mean {loose}?)") from None
    proto: int | None = None
    port: int | None = None
    if len(words) >= 2:
        p = words[1].lower()
        if p in PROTOCOLS:
            proto = PROTOCOLS[p]
        elif p.isdigit() and 0 <= int(p) <= 255:
            proto = int(p)
        else:
            names = ", ".join(n for n in PROTOCOLS if n != "ipv6-icmp")
            raise BadValue(f"has an unknown protocol {words[1]!r} (use {names} or 0 to 255)")
        if proto == 1 and net.version == 6:
            raise BadValue("uses icmp with an IPv6 network (use icmpv6)")
        if proto == 58 and net.version == 4:
            raise BadValue("uses icmpv6 with an IPv4 network (use icmp)")
    if len(words) == 3:
        if proto not in PORT_PROTOCOLS:
            raise BadValue("has a port, but ports need tcp, udp or sctp")
        if not words[2].isdigit() or not 1 <= int(words[2]) <= 65535:
            raise BadValue(f"has a bad port {words[2]!r} (1 to 65535)")
        port = int(words[2])
    return PolicyEntry(net, proto, port)


_FQDN_RE = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def parse_local_id(text: str) -> str:
    """``%null``, ``@host.example.org`` or an IP address (canonical form)."""
    if text == "%null":
        return text
    if text.startswith("@"):
        if _FQDN_RE.fullmatch(text[1:]):
            return text
        raise BadValue("is not @ followed by a host name (e.g. @router.example.org)")
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise BadValue("is not %null, @fqdn or an IP address") from None
