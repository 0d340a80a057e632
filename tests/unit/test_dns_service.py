"""DnsService wiring: when the daemon runs it, and one clear error for a missing anchor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.daemon import ServiceError, build_services
from oe_router.dns.service import DnsService, dns_wanted
from oe_router.platform import Platform

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
        await service.start(_config(anchor))
        try:
            port = service.bound[0].port
            with pytest.raises(ServiceError, match=r"^oe\.dns\.trust_anchor: "):
                await service.reload(_config(tmp_path / "gone.key"))
            assert service.bound[0].port == port
            assert service.status().dns["ipseckey_trigger"] == "on"
        finally:
            await service.stop()

    asyncio.run(main())
