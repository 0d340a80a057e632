"""The DNS capture's nft script and its on/off state (capture.py), with a recording session.

The kernel side (the owned table really redirecting, and vanishing with the process) is
tests/host/test_dns_capture.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.capture import (
    CAPTURE_MARK,
    CaptureError,
    DnsCapture,
    capture_plan,
    capture_script,
)
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamClient
from tests.aio import running

DEFAULT_LISTEN = (Endpoint("127.0.0.1", 5335), Endpoint("::1", 5335))
ANCHOR = ". 3600 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"


class Session:
    """Records what would go to nf_tables; ``refuse`` makes the next run fail."""

    opened = 0

    def __init__(self) -> None:
        Session.opened += 1
        self.scripts: list[str] = []
        self.closed = False
        self.refuse = ""

    def run(self, script: str) -> None:
        if self.refuse:
            raise CaptureError(self.refuse)
        self.scripts.append(script)

    def close(self) -> None:
        self.closed = True


def _capture(sessions: list[Session], mark_problem: str | None = None) -> DnsCapture:
    def factory() -> Session:
        session = Session()
        sessions.append(session)
        return session

    return DnsCapture(factory, mark_check=lambda mark: mark_problem)


def test_the_script_lets_marked_and_local_traffic_pass_then_redirects_port_53() -> None:
    script = capture_script(capture_plan(DEFAULT_LISTEN))
    assert script == (
        "table inet oe_dns {\n"
        "\tflags owner\n"
        "\tchain output {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        f"\t\tmeta mark {CAPTURE_MARK:#x} return\n"
        "\t\tfib daddr type local return\n"
        "\t\tmeta nfproto ipv4 meta l4proto { udp, tcp } th dport 53 dnat ip to 127.0.0.1:5335\n"
        "\t\tmeta nfproto ipv6 meta l4proto { udp, tcp } th dport 53 dnat ip6 to [::1]:5335\n"
        "\t}\n"
        "}\n"
    )


def test_the_first_loopback_listener_of_each_family_is_the_target() -> None:
    plan = capture_plan(
        (
            Endpoint("192.168.1.1", 53),
            Endpoint("127.0.0.2", 5400),
            Endpoint("127.0.0.1", 5335),
            Endpoint("fd00::1", 53),
        )
    )
    assert (plan.v4, plan.v6) == (Endpoint("127.0.0.2", 5400), None)
    assert plan.gaps == ("IPv6 DNS not captured: oe.dns.listen has no IPv6 loopback address",)
    script = capture_script(plan)
    assert "dnat ip to 127.0.0.2:5400" in script and "ip6" not in script


def test_no_loopback_listener_is_one_error_naming_the_option() -> None:
    plan = capture_plan((Endpoint("192.168.1.1", 53), Endpoint("fd00::1", 53)))
    with pytest.raises(CaptureError, match=r"^IPv4 DNS not captured: oe\.dns\.listen has no"):
        capture_script(plan)


def test_start_replace_and_stop() -> None:
    sessions: list[Session] = []
    capture = _capture(sessions)
    assert capture.describe() == "off: not started"
    capture.start(DEFAULT_LISTEN)
    assert capture.on and len(sessions) == 1
    assert capture.describe() == "on: udp/tcp 53 -> 127.0.0.1:5335, [::1]:5335"
    capture.start(DEFAULT_LISTEN)  # same targets (a reload that changed something else)
    assert len(sessions[0].scripts) == 1
    capture.start((Endpoint("127.0.0.1", 5400),))
    # the same owning session, old rules out and new ones in as one batch
    assert len(sessions) == 1
    replaced = sessions[0].scripts[-1]
    assert replaced.startswith("delete table inet oe_dns\ntable inet oe_dns {")
    assert "127.0.0.1:5400" in replaced
    assert capture.describe() == (
        "on: udp/tcp 53 -> 127.0.0.1:5400 (IPv6 DNS not captured: oe.dns.listen has no"
        " IPv6 loopback address)"
    )
    capture.stop("oe.dns.mode is 'manual'")
    assert sessions[0].scripts[-1] == "delete table inet oe_dns\n" and sessions[0].closed
    assert capture.describe() == "off: oe.dns.mode is 'manual'"


def test_a_refused_or_unmarkable_capture_is_off_with_its_reason() -> None:
    sessions: list[Session] = []
    capture = _capture(sessions, "cannot mark the front's own queries (SO_MARK: denied)")
    capture.start(DEFAULT_LISTEN)
    assert not capture.on and not sessions
    assert capture.describe() == "off: cannot mark the front's own queries (SO_MARK: denied)"

    class Refusing(Session):
        def __init__(self) -> None:
            super().__init__()
            self.refuse = "nft refused the DNS capture: Error: Could not process rule"

    refusing: list[Refusing] = []

    def factory() -> Refusing:
        refusing.append(Refusing())
        return refusing[-1]

    capture = DnsCapture(factory, mark_check=lambda mark: None)
    capture.start(DEFAULT_LISTEN)
    assert not capture.on and refusing[0].closed
    assert capture.describe().startswith("off: nft refused the DNS capture: Error:")


def _service_config(anchor: Path, mode: str = "dnsmasq") -> OeConfig:
    dns = DnsConfig(listen=(Endpoint("127.0.0.1", 0),), trust_anchor=str(anchor))
    return OeConfig(dns=dataclasses.replace(dns, mode=mode))  # type: ignore[arg-type]


def test_the_service_captures_in_dnsmasq_mode_only_while_the_front_runs(tmp_path: Path) -> None:
    anchor = tmp_path / "root.key"
    anchor.write_text(ANCHOR)
    sessions: list[Session] = []
    capture = _capture(sessions)

    async def main() -> None:
        service = DnsService(capture=capture)
        async with running(service, _service_config(anchor)):
            port = service.bound[0].port
            assert service.status().dns["capture"] == f"on: udp/tcp 53 -> 127.0.0.1:{port} " + (
                "(IPv6 DNS not captured: oe.dns.listen has no IPv6 loopback address)"
            )
            # the front's own upstream queries carry the mark the capture lets through
            assert service.resolver is not None
            upstream = service.resolver.upstream
            assert isinstance(upstream, UpstreamClient)
            assert upstream.settings.mark == CAPTURE_MARK
            await service.reload(_service_config(anchor, "manual"))
            assert service.status().dns["capture"] == "off: oe.dns.mode is 'manual'"
            assert sessions[0].closed
            upstream = service.resolver.upstream
            assert isinstance(upstream, UpstreamClient) and upstream.settings.mark == 0
            await service.reload(_service_config(anchor))
            assert capture.on and len(sessions) == 2
        assert service.status().dns["capture"] == "off: DNS front stopped"
        assert sessions[1].closed

    asyncio.run(main())


def test_a_service_without_a_capture_never_captures(tmp_path: Path) -> None:
    anchor = tmp_path / "root.key"
    anchor.write_text(ANCHOR)

    async def main() -> None:
        service = DnsService()
        async with running(service, _service_config(anchor)):
            assert service.status().dns["capture"] == "off: not run by the daemon"

    asyncio.run(main())


def test_the_capture_mark_shares_no_bit_with_the_userspace_datapaths_marks() -> None:
    """The datapath matches its marks by mask (``meta mark & m == m``): a capture mark with
    one of their bits made the WAN egress hook drop the front's upstream queries."""
    from oe_router.datapath.userspace import UserspaceSettings

    s = UserspaceSettings()
    assert CAPTURE_MARK & (s.fwmark | s.stolen_mark) == 0
    assert CAPTURE_MARK & (0x3F00 | 0x00FF0000) == 0  # mwan3's and pbr's default masks
