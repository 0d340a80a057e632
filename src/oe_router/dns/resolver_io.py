"""asyncio edge for the sans-IO validator: ask upstream resolvers over UDP/TCP.

Kept small on purpose: all DNSSEC logic is in `dnssec.py`. This only turns a
`Query` into a DNS message (EDNS0, DO, CD), sends it over UDP, falls back to TCP
when the reply is truncated, retries and moves to the next upstream on
timeouts, and feeds what came back (or None) to the validation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from oe_router.dns.dnssec import Query, Result, Validator

__all__ = ["Upstream", "UpstreamClient", "validate"]


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"{self.host}#{self.port}"


class UpstreamClient:
    """Sends the validator's queries to upstream resolvers, in order."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        timeout: float = 1.5,
        retries: int = 1,
        payload: int = 1232,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream resolver is required")
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.retries = retries
        self.payload = payload

    def make_message(self, query: Query) -> dns.message.QueryMessage:
        msg = dns.message.make_query(
            query.qname,
            query.rdtype,
            use_edns=0,
            want_dnssec=query.do,
            payload=self.payload,
        )
        if query.cd:
            msg.flags |= dns.flags.CD
        return msg

    async def query(self, query: Query) -> dns.message.Message | None:
        """The first good reply, or None when every upstream failed every try."""
        for _ in range(self.retries + 1):
            for upstream in self.upstreams:
                msg = self.make_message(query)
                try:
                    reply, _used_tcp = await dns.asyncquery.udp_with_fallback(
                        msg, upstream.host, timeout=self.timeout, port=upstream.port
                    )
                except (dns.exception.DNSException, OSError, EOFError):
                    continue
                return reply
        return None


async def validate(
    validator: Validator,
    client: UpstreamClient,
    qname: dns.name.Name | str,
    rdtype: dns.rdatatype.RdataType | str,
    clock: Callable[[], float] = time.time,
) -> Result:
    """Run one validation to completion against the upstreams."""
    validation = validator.start(qname, rdtype, clock())
    action = validation.action
    while isinstance(action, Query):
        reply = await client.query(action)
        action = validation.feed(reply, now=clock())
    return action
