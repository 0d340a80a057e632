"""What the IKE endpoint dropped and why: one set of counters its collaborators (the
sockets, the responder admission, the receive path) all add to, shown by ``oe status``."""

from __future__ import annotations

from oe_router.records import record

__all__ = ["EndpointCounters"]


@record
class EndpointCounters:
    """What the endpoint dropped and why; shown by ``oe status`` and asserted by tests."""

    received: int = 0
    sent: int = 0
    malformed: int = 0
    unknown_spi: int = 0
    esp_dropped: int = 0
    keepalives_in: int = 0
    keepalives_out: int = 0
    refused: int = 0
    half_open_dropped: int = 0  #: new IKE_SA_INIT requests refused: the three below
    half_open_refused_source: int = 0  #: its address held ``per_source`` half-open SAs
    half_open_refused_prefix: int = 0  #: its /24 or /64 held ``per_prefix``
    half_open_refused_global: int = 0  #: no slot free nor displaceable
    half_open_displaced: int = 0  #: half-open SAs dropped to make room (RFC 8019 preference)
    half_open_expired: int = 0  #: half-open SAs that never finished IKE_AUTH in time
    cookies_accepted: int = 0  #: requests that came back with a valid COOKIE
    cookies_sent: int = 0
    floated: int = 0
    icmp_errors: int = 0  #: ICMP reports read from the sockets' error queues
    unreachable: int = 0  #: IKE SAs failed at once by an ICMP unreachable quoting our request
    unreachable_soft: int = 0  #: network/host unreachable reports left to the retransmissions
    fragments_dropped: int = 0  #: RFC 7383 fragments refused (a limit, outside the window, forged)
    fragment_messages_abandoned: int = 0  #: fragmented messages given up incomplete
