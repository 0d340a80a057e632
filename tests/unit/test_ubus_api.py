"""The ubus object's methods, policies, ACL and answers, without libubus (sans-IO).

Every method runs a control command through a real ``CommandTable``; the handlers here
stand in for the daemon's services and record what they got.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from oe_router.control.blobmsg import BlobmsgType, decode, encode
from oe_router.control.protocol import COMMAND_ARGS, CommandError, CommandTable, Request
from oe_router.control.ubus_abi import Status
from oe_router.control.ubus_api import (
    MAX_REPLY,
    METHODS,
    Answer,
    acl,
    answer,
    policy,
    signature,
)

REPO = Path(__file__).resolve().parents[2]
STATUS = {"daemon": {"pid": 7}, "tunnels": [{"peer": "192.0.2.7"}], "shunts": [], "dns": {}}


def test_the_methods_the_issue_names_and_their_access() -> None:
    assert {m: (s.command, s.access) for m, s in METHODS.items()} == {
        "status": ("status", "read"),
        "tunnels": ("status", "read"),
        "shunts": ("status", "read"),
        "offload": ("offload", "read"),
        "flush": ("flush", "write"),
        "reload": ("reload", "write"),
        "up": ("up", "write"),
        "down": ("down", "write"),
        "devices": ("devices", "read"),
        "explain": ("explain", "read"),
    }


def test_policies_come_from_command_args() -> None:
    for method, spec in METHODS.items():
        assert [name for name, _ in policy(method)] == list(COMMAND_ARGS[spec.command])
    assert policy("up") == (
        ("peer", BlobmsgType.STRING), ("auth", BlobmsgType.STRING),
        ("mode", BlobmsgType.STRING), ("peer_key", BlobmsgType.STRING),
    )  # fmt: skip
    assert policy("status") == () and signature()["down"] == {"peer": 3}


def test_the_shipped_rpcd_acl_is_the_one_derived_from_the_methods() -> None:
    shipped = json.loads((REPO / "files/usr/share/rpcd/acl.d/oe.json").read_text())
    assert shipped == acl()
    group = shipped["oe"]
    assert group["read"]["ubus"]["oe"] == [
        "status", "tunnels", "shunts", "offload", "devices", "explain"
    ]  # fmt: skip
    assert group["write"]["ubus"]["oe"] == ["flush", "reload", "up", "down"]


@pytest.fixture
def commands() -> tuple[CommandTable, list[Request]]:
    seen: list[Request] = []
    table = CommandTable()

    async def status(req: Request) -> dict[str, Any]:
        seen.append(req)
        return {"status": STATUS}

    async def up(req: Request) -> dict[str, Any]:
        seen.append(req)
        if req.args["peer"] == "192.0.2.99":
            raise CommandError("no IKE responder at 192.0.2.99:500")
        return {"ike": {"peer": req.args["peer"]}}

    async def reload(req: Request) -> dict[str, Any]:
        return {"reload": {"accepted": False, "generation": 3, "problems": ["oe.x: bad"]}}

    async def offload(req: Request) -> dict[str, Any]:
        raise ZeroDivisionError("a handler's bug")

    async def flush(req: Request) -> dict[str, Any]:
        return {"flushed": 2, "filler": "x" * MAX_REPLY}

    for name, fn in (
        ("status", status), ("up", up), ("reload", reload), ("offload", offload),
        ("flush", flush),
    ):  # fmt: skip
        table.register(name, fn)
    return table, seen


def _call(table: CommandTable, method: str, args: dict[str, Any] | bytes) -> Answer:
    blob = args if isinstance(args, bytes) else encode(args)
    return asyncio.run(answer(table, method, blob))


def test_status_tunnels_and_shunts_are_the_status_document_and_its_parts(
    commands: tuple[CommandTable, list[Request]],
) -> None:
    table, seen = commands
    a = _call(table, "status", {})
    assert a.status is Status.OK and decode(a.data) == STATUS
    assert decode(_call(table, "tunnels", {}).data) == {"tunnels": STATUS["tunnels"]}
    assert decode(_call(table, "shunts", {}).data) == {"shunts": []}
    assert [r.cmd for r in seen] == ["status"] * 3


def test_the_session_uhttpd_adds_is_not_an_argument(
    commands: tuple[CommandTable, list[Request]],
) -> None:
    table, seen = commands
    sid = {"ubus_rpc_session": "0123456789abcdef0123456789abcdef"}
    assert _call(table, "status", sid).status is Status.OK
    assert _call(table, "up", {"peer": "192.0.2.7", **sid}).status is Status.OK
    assert seen[-1] == Request("up", {"peer": "192.0.2.7"})
    bad = _call(table, "status", {"ubus_rpc_session": 7})  # not uhttpd's: an argument
    assert bad.status is Status.INVALID_ARGUMENT


def test_write_methods_pass_their_arguments_through_the_command_table(
    commands: tuple[CommandTable, list[Request]],
) -> None:
    table, seen = commands
    a = _call(table, "up", {"peer": "192.0.2.7", "mode": "transport"})
    assert a.status is Status.OK and decode(a.data) == {"ike": {"peer": "192.0.2.7"}}
    assert seen[-1] == Request("up", {"peer": "192.0.2.7", "mode": "transport"})


@pytest.mark.parametrize(
    ("method", "args", "status", "error"),
    [
        ("status", {"x": 1}, Status.INVALID_ARGUMENT, "status: takes no arguments"),
        ("tunnels", {"x": 1}, Status.INVALID_ARGUMENT, "tunnels: takes no arguments"),
        ("up", {}, Status.INVALID_ARGUMENT, 'up: needs "peer"'),
        ("up", {"peer": 7}, Status.INVALID_ARGUMENT, "up: peer must be a string, not a number"),
        ("up", {"peer": "a b"}, Status.INVALID_ARGUMENT, "contains a space"),
        ("up", {"peer": "x", "auth": "psk"}, Status.INVALID_ARGUMENT, "use null or pubkey"),
        ("up", {"peer": "192.0.2.99"}, Status.UNKNOWN_ERROR, "up: no IKE responder"),
        ("up", b"\x00\x00\x00\x09garbage", Status.INVALID_ARGUMENT, "up: malformed arguments"),
        ("down", {"peer": "x"}, Status.NOT_SUPPORTED, "down: not available"),
        ("offload", {}, Status.UNKNOWN_ERROR, "offload: internal error (ZeroDivisionError"),
        ("flush", {}, Status.NO_MEMORY, "over ubus's limit; use oe flush"),
        ("nope", {}, Status.METHOD_NOT_FOUND, "no method 'nope'"),
    ],
)
def test_refusals_carry_a_status_and_one_line(
    commands: tuple[CommandTable, list[Request]],
    caplog: pytest.LogCaptureFixture,
    method: str,
    args: dict[str, Any] | bytes,
    status: Status,
    error: str,
) -> None:
    with caplog.at_level(logging.ERROR, logger="oe_router.control"):
        a = _call(commands[0], method, args)
    assert a.status is status
    body = decode(a.data)
    assert set(body) == {"error"} and error in body["error"] and "\n" not in body["error"]
    assert bool(caplog.records) == (method == "offload")  # only a bug is logged


def test_a_refused_reload_is_a_failure_with_its_reasons(
    commands: tuple[CommandTable, list[Request]],
) -> None:
    a = _call(commands[0], "reload", {})
    assert a.status is Status.UNKNOWN_ERROR
    body = decode(a.data)
    assert body["reload"]["accepted"] is False and body["error"] == "reload refused: oe.x: bad"
