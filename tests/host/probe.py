"""The OE service's IKE seam stood in for by a probe, for host tests in network namespaces.

``ProbeNegotiator`` does what an initiator does first, over the network: it sends a
datagram to the peer's UDP 500 from a socket bypassed from XFRM; where the world runs no
IKE responder its kernel answers ICMP port unreachable and the negotiation fails for
real ("no peer"), for IPv4 and IPv6 peers. The addresses are those of
tests/host/test_oe_service.py's topology: the router's WAN 198.51.100.1, the world's
destinations POC (private-or-clear) and PRIV (private) with a UDP receiver on PORT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import replace

from oe_router.config.schema import OeConfig, PolicyConfig, parse_policy_entry
from oe_router.datapath.base import ChildSaSpec, IPAddress
from oe_router.datapath.kernel import bypass_socket
from oe_router.datapath.netns import in_netns
from oe_router.oe.actions import ChildRequest, NegotiationResult
from oe_router.oe.service import OeService, kernel_datapath

WAN = ipaddress.IPv4Address("198.51.100.1")
POC = "203.0.113.7"  # private-or-clear
PRIV = "192.0.2.7"  # private
PORT = 9999


class ProbeNegotiator:
    """IKE seam stand-in: probes UDP 500 of the peer; no responder there -> failure."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.requests: list[ChildRequest] = []

    async def negotiate(self, request: ChildRequest, now: float) -> NegotiationResult:
        self.requests.append(request)
        family = socket.AF_INET6 if request.peer.version == 6 else socket.AF_INET
        with in_netns(self.netns):
            s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            bypass_socket(s)  # as the IKE endpoint does, or the trap captures IKE itself
            s.setblocking(False)
            s.connect((str(request.peer), 500))
            loop = asyncio.get_running_loop()
            for _ in range(3):
                s.send(bytes(28))  # IKE header-sized; nobody parses it
                try:
                    await asyncio.wait_for(loop.sock_recv(s, 2048), 0.5)
                except ConnectionRefusedError:
                    return NegotiationResult(None, f"no IKE responder at {request.peer}:500")
                except TimeoutError:
                    continue
            return NegotiationResult(None, f"no answer from {request.peer}:500")
        finally:
            s.close()

    async def rekey(self, peer: IPAddress, child: ChildSaSpec, now: float) -> NegotiationResult:
        return NegotiationResult(None, "rekey not supported by the probe")

    async def delete(self, peer: IPAddress, child: ChildSaSpec | None) -> None:
        return None


def probe_config(shunt_lifetime: float = 900.0) -> OeConfig:
    """The groups of the topology above: PRIV's /24 private, 198.18.0.0/15 block."""
    return OeConfig(
        shunt_lifetime=shunt_lifetime,
        policy=replace(
            PolicyConfig(),
            private=(parse_policy_entry("192.0.2.0/24"),),
            block=(parse_policy_entry("198.18.0.0/15"),),
        ),
    )


def probe_service(netns: str) -> tuple[OeService, ProbeNegotiator]:
    """An OE service on the kernel datapath of ``netns`` with the probe at the IKE seam."""
    neg = ProbeNegotiator(netns)
    svc = OeService(
        datapath_factory=kernel_datapath(netns),
        negotiator=neg,
        wan={4: WAN},
        lan=[ipaddress.ip_network("192.168.1.0/24")],
        dns_upstream=[ipaddress.ip_address("9.9.9.9")],
    )
    return svc, neg
