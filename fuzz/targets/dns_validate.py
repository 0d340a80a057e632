"""Fuzz target: the DNSSEC validator (``dns/dnssec.py``) fed crafted upstream replies.

The validator asks one query at a time; this target answers each from the input, or
with the honest, signed reply of a fixed world (``fuzz/data/dns_validate.json``: signed
zones root -> test. -> example/other/n3/optout/insecure/p384.test., made by
``python -m fuzz.seeds dns``), against that world's root trust anchor at a fixed "now".
So one input can forge, splice into or withhold any single reply of a chain whose other
links are genuine, which is where a validator's bugs live.

Input: byte 0 picks the question (low 5 bits) and the clock (high 3 bits: now, or far
enough off that signatures are expired or not yet valid); then records
``op:u8 len:u16 body``, one per query, in order:

====  ========  ===========================================================
op%4  name      reply fed to the validator
====  ========  ===========================================================
0     HONEST    the world's signed reply (None if the world has none)
1     WIRE      body, parsed as the upstream client parses it
2     SPLICE    the honest reply with body[2:] written at offset u16 body[:2]
3     SILENCE   None (no answer: a timeout or an unparsable reply)
====  ========  ===========================================================

Queries past the last record get honest replies. Oracles: no exception (the upstream
client turns only DNSException into "no reply"); a SECURE positive result carries its
RRset; a SECURE IPSECKEY RRset goes through ``interpret_rrset`` as the key lookup does.
"""

from __future__ import annotations

import json
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

from fuzz.common import Records, fuzz_main, instrumented

with instrumented():
    from oe_router.dns.dnssec import (
        Query,
        Result,
        Status,
        ValidationCache,
        Validator,
        load_trust_anchors,
    )
    from oe_router.dns.ipseckey import interpret_rrset

WORLD_FILE = Path(__file__).resolve().parent.parent / "data" / "dns_validate.json"
HONEST, WIRE, SPLICE, SILENCE = range(4)
#: clock offsets (s) from the world's "now": signatures valid, expired, not yet valid
CLOCKS = (0, 0, 0, 0, 40 * 86400, -3 * 86400, 3600, 29 * 86400)


class World:
    """The honest replies, the anchor and the questions the seeds ask."""

    def __init__(self, path: Path = WORLD_FILE) -> None:
        doc = json.loads(path.read_text())
        self.now = float(doc["now"])
        self.anchors = load_trust_anchors(doc["anchor"])
        self.questions = [
            (dns.name.from_text(q), dns.rdatatype.from_text(t)) for q, t in doc["questions"]
        ]
        self.replies = {key: bytes.fromhex(wire) for key, wire in doc["replies"].items()}

    def honest(self, query: Query) -> bytes | None:
        return self.replies.get(str(query))


def upstream_parse(wire: bytes) -> dns.message.Message | None:
    """What ``UpstreamClient.resolve`` does: DNSException means no usable reply."""
    try:
        return dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None


_world: list[World] = []


def world() -> World:
    """The world, read on first use (the seed generator imports this module to write it)."""
    if not _world:
        _world.append(World())
    return _world[0]


def reply_for(op: int, body: bytes, query: Query) -> dns.message.Message | None:
    kind = op % 4
    honest = world().honest(query)
    if kind == WIRE:
        return upstream_parse(body)
    if kind == SILENCE or honest is None:
        return None
    if kind == SPLICE and len(body) >= 2:
        at = int.from_bytes(body[:2], "big") % (len(honest) + 1)
        patch = body[2:]
        return upstream_parse(honest[:at] + patch + honest[at + len(patch) :])
    return upstream_parse(honest)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    w = world()
    qname, rdtype = w.questions[(data[0] & 0x1F) % len(w.questions)]
    now = w.now + CLOCKS[data[0] >> 5]
    validator = Validator(w.anchors, ValidationCache())
    validation = validator.start(qname, rdtype, now)
    steps = iter(Records(data[1:], 64))
    action = validation.action
    while isinstance(action, Query):
        op, body = next(steps, (HONEST, b""))
        action = validation.feed(reply_for(op, body, action), now=now)
    check(action, qname)


def check(result: Result, qname: dns.name.Name) -> None:
    assert isinstance(result.status, Status) and result.ttl >= 0, result
    if result.status is not Status.SECURE or result.rrset is None:
        assert result.status is not Status.SECURE or result.denial is not None, result
        return
    if result.rrset.rdtype == dns.rdatatype.IPSECKEY:
        interpret_rrset(result.rrset, owner=qname)


if __name__ == "__main__":
    world()
    fuzz_main(test_one_input)
