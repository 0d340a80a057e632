"""Daemon control plane without the control socket: the Service registry contract and reload rules.

The services here are small recording implementations of the `Service` protocol: the
real ones (IKE, datapath, DNS front, OE manager) do not exist yet. The configs are real
UCI files read by the real config layer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from oe_router.config import OeConfig, load_config
from oe_router.control import ShuntStatus, StatusContribution
from oe_router.control.protocol import CommandTable, Request
from oe_router.daemon import Daemon, Service, ServiceError, ServiceRegistry
from oe_router.datapath.base import IPAddress
from oe_router.dns.service import dns_wanted
from oe_router.ike.service import IkeService
from oe_router.platform import Platform
from tests.aio import running

GOOD = "config oe 'global'\n\toption enabled '1'\n\toption log_level 'info'\n"


class Recorder:
    """A Service that records calls and can be told to refuse."""

    def __init__(self, name: str, journal: list[str], refuse_reload: bool = False) -> None:
        self._name = name
        self.journal = journal
        self.refuse_reload = refuse_reload
        self.refuse_start = False
        self.config: OeConfig | None = None

    @property
    def name(self) -> str:
        return self._name

    async def start(self, config: OeConfig) -> None:
        if self.refuse_start:
            raise ServiceError("port 500 is in use")
        self.config = config
        self.journal.append(f"start {self.name}")

    async def reload(self, config: OeConfig) -> None:
        if self.refuse_reload:
            raise ServiceError(f"cannot apply log_level {config.log_level}")
        self.config = config
        self.journal.append(f"reload {self.name} {config.log_level}")

    async def stop(self) -> None:
        self.journal.append(f"stop {self.name}")

    def status(self) -> StatusContribution:
        return StatusContribution(
            shunts=(ShuntStatus(f"{self.name}.example", "clear"),),
            dns={self.name: True},
            datapath="userspace" if self.name == "datapath" else None,
        )


def _daemon(tmp_path: Path, services: list[Service]) -> tuple[Daemon, Path]:
    path = tmp_path / "oe"
    path.write_text(GOOD)
    daemon = Daemon(
        config_path=path,
        config=load_config(path),
        registry=ServiceRegistry(services),
        socket_path=tmp_path / "unused.sock",
        clock=lambda: 100.0,
        pid=4242,
    )
    return daemon, path


def test_services_start_in_order_stop_in_reverse_and_contribute_status(tmp_path: Path) -> None:
    journal: list[str] = []
    a, b = Recorder("datapath", journal), Recorder("dns", journal)
    daemon, _ = _daemon(tmp_path, [a, b])

    async def go() -> dict[str, Any]:
        await daemon.registry.start_all(daemon.config)
        doc = daemon.status().to_json()
        await daemon.registry.stop_all()
        return doc

    doc = asyncio.run(go())
    assert journal == ["start datapath", "start dns", "stop dns", "stop datapath"]
    assert [s["destination"] for s in doc["shunts"]] == ["datapath.example", "dns.example"]
    assert doc["dns"] == {"datapath": True, "dns": True}
    assert doc["daemon"]["datapath"] == "userspace"
    assert doc["daemon"]["services"] == ["datapath", "dns"]
    assert doc["daemon"]["pid"] == 4242


def test_failed_start_stops_the_services_already_started(tmp_path: Path) -> None:
    journal: list[str] = []
    a, b, c = Recorder("a", journal), Recorder("ike", journal), Recorder("c", journal)
    b.refuse_start = True
    daemon, _ = _daemon(tmp_path, [a, b, c])
    with pytest.raises(ServiceError, match="ike: port 500 is in use"):
        asyncio.run(daemon.registry.start_all(daemon.config))
    assert journal == ["start a", "stop a"]
    assert not daemon.registry.running


def test_duplicate_service_names_are_refused(tmp_path: Path) -> None:
    journal: list[str] = []
    with pytest.raises(ValueError, match="'x' is already registered"):
        ServiceRegistry([Recorder("x", journal), Recorder("x", journal)])


def test_invalid_config_never_reaches_services_and_generation_stays(tmp_path: Path) -> None:
    journal: list[str] = []
    daemon, path = _daemon(tmp_path, [Recorder("a", journal)])

    async def go() -> None:
        await daemon.registry.start_all(daemon.config)
        path.write_text(GOOD.replace("'info'", "'shouty'"))
        result = await daemon.reload()
        assert not result.accepted
        assert result.generation == 1
        assert len(result.problems) == 1 and "log_level" in result.problems[0]
        assert "'shouty'" in result.problems[0]

    asyncio.run(go())
    assert journal == ["start a"]
    assert daemon.config.log_level == "info"
    assert daemon.last_reload is not None and not daemon.last_reload.accepted


def test_a_service_refusing_reload_rolls_the_others_back(tmp_path: Path) -> None:
    journal: list[str] = []
    a, b = Recorder("a", journal), Recorder("b", journal, refuse_reload=True)
    daemon, path = _daemon(tmp_path, [a, b])

    async def go() -> None:
        await daemon.registry.start_all(daemon.config)
        path.write_text(GOOD.replace("'info'", "'debug'"))
        result = await daemon.reload()
        assert not result.accepted
        assert result.problems == ("b: cannot apply log_level debug",)

    asyncio.run(go())
    assert journal == ["start a", "start b", "reload a debug", "reload a info"]
    assert daemon.generation == 1 and daemon.config.log_level == "info"
    assert a.config is not None and a.config.log_level == "info"


def test_accepted_reload_bumps_generation_and_reaches_every_service(tmp_path: Path) -> None:
    journal: list[str] = []
    daemon, path = _daemon(tmp_path, [Recorder("a", journal), Recorder("b", journal)])
    seen: list[str] = []
    daemon._on_config = lambda c: seen.append(c.log_level)

    async def go() -> None:
        await daemon.registry.start_all(daemon.config)
        path.write_text(GOOD.replace("'info'", "'debug'"))
        result = await daemon.reload()
        assert result.accepted and result.generation == 2

    asyncio.run(go())
    assert journal[-2:] == ["reload a debug", "reload b debug"]
    assert seen == ["debug"]


def test_disabling_stops_services_and_enabling_starts_them(tmp_path: Path) -> None:
    journal: list[str] = []
    daemon, path = _daemon(tmp_path, [Recorder("a", journal)])

    async def go() -> None:
        await daemon.registry.start_all(daemon.config)
        path.write_text(GOOD.replace("enabled '1'", "enabled '0'"))
        assert (await daemon.reload()).accepted
        assert not daemon.registry.running
        path.write_text(GOOD)
        assert (await daemon.reload()).accepted

    asyncio.run(go())
    assert journal == ["start a", "stop a", "start a"]
    assert daemon.generation == 3


def test_status_and_reload_commands_through_the_command_table(tmp_path: Path) -> None:
    daemon, path = _daemon(tmp_path, [])

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        status = await daemon.commands.dispatch(b'{"cmd": "status"}')
        path.write_text("config oe 'global'\n\toption bogus '1'\n")
        reload = await daemon.commands.dispatch(b'{"cmd": "reload"}')
        helped = await daemon.commands.dispatch(b'{"cmd": "help"}')
        return status, reload, helped

    status, reload, helped = asyncio.run(go())
    json.dumps(status)  # the reply is JSON-serialisable as is
    assert status["ok"] is True
    assert status["status"]["daemon"]["config_generation"] == 1
    assert reload["ok"] is True
    assert reload["reload"]["accepted"] is False
    assert "bogus" in reload["reload"]["problems"][0]
    assert set(helped["commands"]) == {"status", "reload", "help", "devices", "explain"}


def test_reload_with_arguments_is_refused_like_help_and_reloads_nothing(tmp_path: Path) -> None:
    """Issue 13: `reload` took any extra argument silently (and reloaded)."""
    journal: list[str] = []
    daemon, path = _daemon(tmp_path, [Recorder("a", journal)])

    async def go() -> list[dict[str, Any]]:
        await daemon.registry.start_all(daemon.config)
        path.write_text(GOOD.replace("'info'", "'debug'"))  # a reload would accept this
        return [
            await daemon.commands.dispatch(b'{"cmd": "reload", "now": true}'),
            await daemon.commands.dispatch(b'{"cmd": "reload", "config": "/tmp/evil"}'),
            await daemon.commands.dispatch(b'{"cmd": "help", "x": 1}'),
        ]

    replies = asyncio.run(go())
    assert replies == [
        {"ok": False, "error": "reload: takes no arguments"},
        {"ok": False, "error": "reload: takes no arguments"},
        {"ok": False, "error": "help: takes no arguments"},
    ]
    assert daemon.generation == 1 and daemon.last_reload is None
    assert daemon.config.log_level == "info" and journal == ["start a"]


def test_down_and_up_with_hostile_names_are_refused_by_the_table_not_the_resolver(
    tmp_path: Path,
) -> None:
    """Issue 11: `down` with a 60,000-character name answered "internal error" (the
    resolver's IDNA encoder raised UnicodeError). The real IKE service's commands, on
    loopback, behind the daemon's command table."""
    daemon, _ = _daemon(tmp_path, [])
    ike = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
    ike.register_commands(daemon.commands)
    long = "a" * 60_000
    cases = [
        ({"cmd": "down", "peer": long}, "down: peer too long (60000 characters, max 253)"),
        ({"cmd": "up", "peer": long}, "up: peer too long (60000 characters, max 253)"),
        ({"cmd": "down", "peer": "a\x00b"}, "down: peer 'a\\x00b': contains a space or"),
        ({"cmd": "down", "peer": "a..b"}, "down: peer 'a..b': not an IP address or a host"),
        ({"cmd": "down", "peer": "x" * 64}, "not an IP address or a host name"),
        ({"cmd": "down", "peer": 7}, "down: peer must be a string, not a number"),
        ({"cmd": "up", "peer": "127.0.0.1", "peer_key": "k" * 70_000}, "request longer than"),
    ]

    async def go() -> list[dict[str, Any]]:
        async with running(ike, OeConfig()):
            return [await daemon.commands.dispatch(json.dumps(c).encode()) for c, _ in cases]

    for (case, error), reply in zip(cases, asyncio.run(go()), strict=True):
        assert reply["ok"] is False, case
        assert str(reply["error"]).startswith(error) or error in reply["error"], reply
        assert "internal error" not in reply["error"]


# -- a reload looks at the addresses again (netifd's interface trigger) --------------------

WAN_A = ipaddress.ip_address("192.0.2.10")
WAN_B = ipaddress.ip_address("198.51.100.7")


class Network:
    """The addresses a reload's probe finds: tests move the WAN between calls."""

    def __init__(self, wan: tuple[IPAddress, ...]) -> None:
        self.wan = wan
        self.calls = 0

    def __call__(self, config: OeConfig, platform: Platform) -> Platform:
        self.calls += 1
        return dataclasses.replace(
            platform,
            wan={a.version: a for a in reversed(self.wan)},
            wan_addresses=self.wan,
            wan_reason="" if self.wan else "oe.global.wan_interface: no global address",
        )


def _rebuilding_daemon(
    tmp_path: Path, wan: tuple[IPAddress, ...], journal: list[str], *, with_oe: bool = False
) -> tuple[Daemon, Network, list[Platform]]:
    """A daemon whose registry is built per platform: "ike@<WAN>" when there is a WAN, and
    a service that registers a command, as IkeService registers up/down (and "oe", the
    datapath's service, when ``with_oe``)."""
    network = Network(wan)
    built: list[Platform] = []

    class WithCommand(Recorder):
        def register_commands(self, commands: CommandTable) -> None:
            async def handler(request: Request) -> dict[str, object]:
                return {"served_by": self.name}

            commands.register("flush", handler)

    def build(config: OeConfig, platform: Platform) -> ServiceRegistry:
        built.append(platform)
        names = [f"ike@{a}" for a in platform.wan_addresses] or ["status-only"]
        services: list[Service] = [WithCommand(names[0], journal)]
        if with_oe:
            services.append(Recorder("oe", journal))
        if dns_wanted(config):
            services.append(Recorder("dns", journal))
        return ServiceRegistry(services)

    path = tmp_path / "oe"
    # a fixed trust anchor that is not there: no DNS front, so only addresses matter here
    path.write_text(GOOD + f"config dns 'dns'\n\toption trust_anchor '{tmp_path}/none.key'\n")
    config = load_config(path)
    platform = network(config, Platform())
    daemon = Daemon(
        config_path=path,
        config=config,
        registry=build(config, platform),
        socket_path=tmp_path / "unused.sock",
        platform=platform,
        network=network,
        build=build,
    )
    daemon.adopt_commands()
    return daemon, network, built


async def _flush_reply(daemon: Daemon) -> object:
    return (await daemon.commands.dispatch(b'{"cmd": "flush"}\n')).get("served_by")


def test_reload_with_the_same_addresses_reloads_in_place(tmp_path: Path) -> None:
    journal: list[str] = []
    daemon, network, built = _rebuilding_daemon(tmp_path, (WAN_A,), journal)

    async def go() -> bool:
        await daemon.registry.start_all(daemon.config)
        return (await daemon.reload()).accepted

    assert asyncio.run(go())
    assert network.calls == 2 and len(built) == 1
    assert journal == [f"start ike@{WAN_A}", f"reload ike@{WAN_A} info"]


def test_a_new_wan_address_rebuilds_the_services_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal: list[str] = []
    daemon, network, built = _rebuilding_daemon(tmp_path, (WAN_A,), journal)

    async def go() -> tuple[bool, object]:
        await daemon.registry.start_all(daemon.config)
        network.wan = (WAN_B,)
        result = await daemon.reload()
        return result.accepted, await _flush_reply(daemon)

    with caplog.at_level(logging.WARNING, logger="oe_router.daemon"):
        ok, served_by = asyncio.run(go())
    assert ok and daemon.generation == 2
    assert journal == [f"start ike@{WAN_A}", f"stop ike@{WAN_A}", f"start ike@{WAN_B}"]
    assert daemon.registry.names == (f"ike@{WAN_B}",)
    assert daemon.platform is not None and daemon.platform.wan_addresses == (WAN_B,)
    assert built[-1].wan == {4: WAN_B}
    # the control commands now reach the new services, not the stopped ones
    assert served_by == f"ike@{WAN_B}"
    assert f"network changed (WAN {WAN_A} -> {WAN_B}): restarting the services" in caplog.text


def test_an_address_event_rebuilds_only_when_the_network_changed(tmp_path: Path) -> None:
    """The kernel's address events (netwatch) reach ``network_event``: the config stays, the
    services are rebuilt for a new address, and an event that changed nothing is a look."""
    journal: list[str] = []
    daemon, network, _ = _rebuilding_daemon(tmp_path, (WAN_A,), journal)

    async def go() -> list[bool]:
        await daemon.registry.start_all(daemon.config)
        same = await daemon.network_event()
        network.wan = (WAN_B,)
        return [same, await daemon.network_event()]

    assert asyncio.run(go()) == [False, True]
    assert journal == [f"start ike@{WAN_A}", f"stop ike@{WAN_A}", f"start ike@{WAN_B}"]
    assert daemon.generation == 1  # not a reload
    assert network.calls == 3


def test_a_wan_that_comes_up_after_start_brings_oe_up(tmp_path: Path) -> None:
    """START=90 on a slow PPPoE or DHCP link: no WAN address at start, then netifd's trigger."""
    journal: list[str] = []
    daemon, network, _ = _rebuilding_daemon(tmp_path, (), journal)

    async def go() -> bool:
        await daemon.registry.start_all(daemon.config)
        network.wan = (WAN_A,)
        return (await daemon.reload()).accepted

    assert asyncio.run(go())
    assert journal == ["start status-only", "stop status-only", f"start ike@{WAN_A}"]


def test_a_rebuild_whose_start_fails_is_refused_and_the_next_reload_starts_it(
    tmp_path: Path,
) -> None:
    journal: list[str] = []
    daemon, network, _ = _rebuilding_daemon(tmp_path, (WAN_A,), journal)
    refuse = [True]
    original = Recorder.start

    async def start(self: Recorder, config: OeConfig) -> None:
        if refuse[0] and self.name == f"ike@{WAN_B}":
            raise ServiceError("port 500 is in use")
        await original(self, config)

    async def go() -> tuple[Any, Any]:
        await daemon.registry.start_all(daemon.config)
        network.wan = (WAN_B,)
        first = await daemon.reload()
        refuse[0] = False
        second = await daemon.reload()
        return first, second

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Recorder, "start", start)
        first, second = asyncio.run(go())
    assert not first.accepted and "port 500 is in use" in first.problems[0]
    assert second.accepted and daemon.registry.running and daemon.generation == 2
    assert journal == [f"start ike@{WAN_A}", f"stop ike@{WAN_A}", f"start ike@{WAN_B}"]


def test_a_trust_anchor_that_appears_starts_the_dns_front_on_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal: list[str] = []
    daemon, _, built = _rebuilding_daemon(tmp_path, (WAN_A,), journal)

    async def go() -> tuple[bool, bool]:
        await daemon.registry.start_all(daemon.config)
        (tmp_path / "none.key").write_text(". IN DS 20326 8 2 E06D44B8\n")
        first = (await daemon.reload()).accepted
        return first, (await daemon.reload()).accepted

    with caplog.at_level(logging.WARNING, logger="oe_router.daemon"):
        assert asyncio.run(go()) == (True, True)
    assert daemon.registry.names == (f"ike@{WAN_A}", "dns")
    assert len(built) == 2  # the second reload found nothing new: in place
    assert journal[-3:] == ["start dns", f"reload ike@{WAN_A} info", "reload dns info"]
    assert "DNS front: a trust anchor is there now: restarting the services" in caplog.text


def test_turning_packet_hold_on_or_off_rebuilds_the_datapath(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel datapath is made with or without the hold (``kernel_datapath``): a reload
    that changes ``packet_hold`` builds the services again, one that keeps it reloads."""
    journal: list[str] = []
    daemon, _, built = _rebuilding_daemon(tmp_path, (WAN_A,), journal, with_oe=True)
    path = daemon.config_path
    base = path.read_text()

    async def go() -> list[bool]:
        await daemon.registry.start_all(daemon.config)
        out = []
        for hold in ("0", "0", "1"):
            path.write_text(base.replace(GOOD, GOOD + f"\toption packet_hold '{hold}'\n"))
            out.append((await daemon.reload()).accepted)
        return out

    assert daemon.config.packet_hold is True  # the default
    with caplog.at_level(logging.WARNING, logger="oe_router.daemon"):
        assert asyncio.run(go()) == [True, True, True]
    assert len(built) == 3  # off (rebuilt), off again (in place), on (rebuilt)
    assert journal.count("start oe") == 3 and journal.count("reload oe info") == 1
    assert "packet_hold off: restarting the services" in caplog.text
    assert "packet_hold on: restarting the services" in caplog.text
    assert daemon.config.packet_hold is True and daemon.generation == 4


class Warming(Recorder):
    """A Recorder with a warm-up (the IKE service has one)."""

    async def warm(self) -> None:
        self.journal.append(f"warm {self.name}")


def test_services_warm_up_once_all_have_started_and_the_daemon_serves(tmp_path: Path) -> None:
    """The warm-up runs after every service started (the daemon is ready), once, only
    for services that have one."""
    journal: list[str] = []
    daemon, _ = _daemon(tmp_path, [Warming("ike", journal), Recorder("dns", journal)])

    async def go() -> None:
        task = asyncio.create_task(daemon.run())
        async with asyncio.timeout(5):
            while "warm ike" not in journal:
                await asyncio.sleep(0.01)
        daemon.request_stop()
        assert await task == 0

    asyncio.run(go())
    assert journal == ["start ike", "start dns", "warm ike", "stop dns", "stop ike"]
