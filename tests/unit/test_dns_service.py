"""DnsService wiring: when the daemon runs it, and one clear error for a missing anchor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig, parse_endpoint
from oe_router.daemon import ServiceError, build_services
from oe_router.dns.service import DnsService, dns_wanted
from oe_router.dns.upstream import UpstreamSettings
from oe_router.platform import Platform
from tests.aio import running

ANCHOR = ". 3600 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"


def _config(anchor: Path) -> OeConfig:
    return OeConfig(dns=DnsConfig(listen=(Endpoint("127.0.0.1", 0),), trust_anchor=str(anchor)))


def test_dns_runs_only_with_a_trust_anchor_file(tmp_path: Path) -> None:
    anchor = tmp_path / "root.key"
    assert not dns_wanted(_config(anchor))
    no_wan = Platform(wan_reason="no interface named 'wan'")
    assert build_services(_config(anchor), platform=no_wan).names == ("offload", "oe")
    anchor.write_text(ANCHOR)
    assert dns_wanted(_config(anchor))
    assert build_services(_config(anchor), platform=no_wan).names == ("offload", "oe", "dns")


def test_missing_anchor_is_one_service_error_naming_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "gone.key"
    with pytest.raises(ServiceError) as err:
        asyncio.run(DnsService().start(_config(missing)))
    assert str(err.value).startswith(f"oe.dns.trust_anchor: {missing} does not exist")


def test_reload_to_a_missing_anchor_is_refused_and_the_old_one_keeps_running(
    tmp_path: Path,
) -> None:
    anchor = tmp_path / "root.key"
    anchor.write_text(ANCHOR)

    async def main() -> None:
        service = DnsService()
        async with running(service, _config(anchor)):
            port = service.bound[0].port
            with pytest.raises(ServiceError, match=r"^oe\.dns\.trust_anchor: "):
                await service.reload(_config(tmp_path / "gone.key"))
            assert service.bound[0].port == port
            assert service.status().dns["ipseckey_trigger"] == "on"

    asyncio.run(main())


def _managed(state: Path, upstream: str = "127.0.0.1:9") -> OeConfig:
    """The shipped default: no fixed anchor, the RFC 5011 state in ``state``."""
    dns_config = DnsConfig(
        listen=(Endpoint("127.0.0.1", 0),),
        upstream=(parse_endpoint(upstream),),
        auto_trust_anchor=str(state),
    )
    return OeConfig(dns=dns_config)


def test_out_of_the_box_the_front_runs_from_the_shipped_iana_anchors(tmp_path: Path) -> None:
    assert OeConfig().dns.trust_anchor == ""
    assert OeConfig().dns.auto_trust_anchor == "/etc/oe/root.anchors"
    assert dns_wanted(OeConfig())
    no_wan = Platform(wan_reason="no interface named 'wan'")
    assert build_services(_managed(tmp_path / "a"), platform=no_wan).names[-1] == "dns"
    state = tmp_path / "etc" / "root.anchors"

    async def main() -> None:
        service = DnsService(upstream_settings=UpstreamSettings(timeout=0.2, tries=1))
        async with running(service, _managed(state)):
            status = service.status()
            assert status.dns["ipseckey_trigger"] == "on"
            assert status.dns["trust_anchor"] == f"rfc5011 {state}"
            assert status.dns["trust_anchor_source"] == "shipped IANA root anchors"
            rows = {(a.key_tag, a.state, a.form) for a in status.trust_anchors}
            assert rows == {(20326, "valid", "ds"), (38696, "valid", "ds")}
            probe = status.dns
            for _ in range(100):  # the first probe goes out at once; nobody answers it
                probe = service.status().dns
                if str(probe["anchor_probe"]).startswith("failed"):
                    break
                await asyncio.sleep(0.05)
            assert str(probe["anchor_probe"]).startswith("failed at ")
            assert 3500 <= int(str(probe["anchor_next_probe_s"])) <= 3600  # retry in an hour
            assert not state.exists()  # nothing learnt: nothing written
            managed = service.managed
            await service.reload(_managed(state, "127.0.0.1:19"))
            assert service.managed is managed  # same file: the same trust point
            await service.reload(_managed(tmp_path / "other"))
            assert service.managed is not managed and service.managed is not None
            await service.reload(_config(_anchor(tmp_path)))
            assert service.managed is None
            assert service.status().dns["trust_anchor"] == f"file {tmp_path / 'root.key'}"
            assert service.status().trust_anchors == ()
        assert service.managed is None

    asyncio.run(main())


def _anchor(tmp_path: Path) -> Path:
    path = tmp_path / "root.key"
    path.write_text(ANCHOR)
    return path
