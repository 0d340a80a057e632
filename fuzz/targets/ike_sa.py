"""Fuzz target: a responder IKE SA behind the endpoint, driven through whole exchanges.

Why stateful: most IKE code runs only once IKE_SA_INIT has agreed on keys, and random
bytes never pass an integrity check. So an honest initiator (our own ``IkeSa``) talks
to the endpoint's responder, and the input is a list of steps (``fuzz.common.Records``)
that interleave honest traffic with attacks, including requests *sealed with the real
keys* whose plaintext payload chain comes from the input (an attacker who knows the
keys, or a buggy peer). Everything is deterministic: SPIs, nonces, IVs and even the DH
private values come from a stream reset per input, and time is a value.

Input: 1 config byte (options of both sides), then records ``op:u8 len:u16 body``:

=====  =========  ===========================================================
op%8   name       body
=====  =========  ===========================================================
0      HONEST     (none) one round trip: initiator -> endpoint -> initiator
1      RAW        bit0 of byte 0: via UDP 4500; rest: the datagram as sent
2      SEALED     exch, flags, mid delta (i8), first payload, frag, chain
3      INIT       spi_i choice, first payload, chain (an IKE_SA_INIT request)
4      TIME       u16 tenths of a second to advance, then timers run
5      COMMAND    byte 0: what the honest initiator starts (child, rekey...)
6,7    ANSWER     like SEALED, but sealed as a *response* to the endpoint
=====  =========  ===========================================================

Oracle: nothing raises (the endpoint's socket callback would log every packet's
traceback), every datagram the endpoint sends decodes, and the half-open table never
exceeds its limit.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fuzz.common import Records, Stream, fuzz_main, instrumented

with instrumented():
    from oe_router.ike import crypto
    from oe_router.ike.constants import ExchangeType, HeaderFlag, PayloadType
    from oe_router.ike.crypto import SkCipher
    from oe_router.ike.endpoint import NON_ESP_MARKER, IkeEndpoint, SaHandle
    from oe_router.ike.errors import IkeError
    from oe_router.ike.events import Event
    from oe_router.ike.message import Message
    from oe_router.ike.payloads import GenericHeader, IkeHeader, TrafficSelector
    from oe_router.ike.proposals import DEFAULT_IKE_PROPOSALS, IkeProposalSpec
    from oe_router.ike.sa import IkeSa, IkeSaConfig

I_ADDR = ("192.0.2.1", 500)
R_IP = "198.51.100.7"
R_ADDR = (R_IP, 500)
T0 = 1000.0
MAX_STEPS = 24
HALF_OPEN_LIMIT = 4
HONEST, RAW, SEALED, INIT, TIME, COMMAND = range(6)
EXCHANGES = (
    ExchangeType.IKE_AUTH,
    ExchangeType.CREATE_CHILD_SA,
    ExchangeType.INFORMATIONAL,
    ExchangeType.IKE_SA_INIT,
)
SKF_HEAD = struct.Struct("!HH")

# Deterministic DH: the endpoint's responder and our initiator call these.
_dh = Stream(b"dh")


def _x25519() -> crypto.X25519Exchange:
    return crypto.X25519Exchange.from_private_bytes(_dh(32))


def _ecp256() -> crypto.Ecp256Exchange:
    return crypto.Ecp256Exchange.from_private_value(1 + int.from_bytes(_dh(31), "big"))


def _modp() -> crypto.Modp2048Exchange:
    return crypto.Modp2048Exchange.from_private_value(2 + int.from_bytes(_dh(32), "big"))


crypto.X25519Exchange.generate = staticmethod(_x25519)  # type: ignore[method-assign,assignment]
crypto.Ecp256Exchange.generate = staticmethod(_ecp256)  # type: ignore[method-assign,assignment]
crypto.Modp2048Exchange.generate = staticmethod(_modp)  # type: ignore[method-assign,assignment]

ED_I = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED_R = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _ts(ip: str) -> TrafficSelector:
    a = ipaddress.ip_address(ip)
    return TrafficSelector.from_range(a, a)


def configs(option: int) -> tuple[IkeSaConfig, IkeSaConfig]:
    """Both sides' configs; the bits of ``option`` turn on features that add code paths."""
    groups = ((31,), (19,), (14,), (31, 19))[option & 3]
    spec = DEFAULT_IKE_PROPOSALS[0]
    ike_props = (IkeProposalSpec(spec.encr, spec.key_bits, spec.prf, spec.integ, groups),)
    if option & 0x40:  # CBC + HMAC instead of the default AEAD first
        ike_props = tuple(p for p in DEFAULT_IKE_PROPOSALS if p.integ) or ike_props
    signed = bool(option & 0x04)
    common: dict[str, Any] = {
        "fragment_size": 256 if option & 0x08 else 1280,
        "ike_lifetime": 600.0 if option & 0x10 else None,
        "child_lifetime": 300.0 if option & 0x10 else None,
        "transport_mode": bool(option & 0x80),
        "retransmit_tries": 2,
    }
    ini = IkeSaConfig(
        I_ADDR,
        R_ADDR,
        (_ts(I_ADDR[0]),),
        (_ts(R_IP),),
        ike_proposals=ike_props,
        private_key=ED_I if signed else None,
        peer_public_key=ED_R.public_key() if signed else None,
        request_internal_address=bool(option & 0x20),
        initial_contact=bool(option & 0x20),
        **common,
    )
    res = IkeSaConfig(
        R_ADDR,
        I_ADDR,
        (_ts(R_IP),),
        (_ts(I_ADDR[0]),),
        private_key=ED_R if signed else None,
        peer_public_key=ED_I.public_key() if signed else None,
        internal_addresses=("10.9.0.2", "fd00:9::2") if option & 0x20 else (),
        **common,
    )
    return ini, res


class Endpoint(IkeEndpoint):
    """The real endpoint with its socket send replaced by a list."""

    def __init__(self, **kw: Any) -> None:
        super().__init__([R_IP], **kw)
        self.sent: list[tuple[bytes, bool, tuple[str, int]]] = []  # data, raw, to
        self._sockets.send = self._send  # type: ignore[method-assign]

    def _send(
        self,
        local_ip: str,
        natt: bool,
        data: bytes,
        remote: tuple[str, int],
        *,
        raw: bool = False,
    ) -> None:
        self.sent.append((data, raw, remote))


class Run:
    """One input's world: the endpoint (responder), the honest initiator and a clock."""

    def __init__(self, option: int) -> None:
        _dh.reset()
        self.now = T0
        self.ini_cfg, res_cfg = configs(option)
        self.events: list[Event] = []
        self.ep = Endpoint(
            on_event=self._event,
            responder_policy=lambda local, remote: res_cfg,
            clock=lambda: self.now,
            random=Stream(b"responder"),
            half_open_limit=HALF_OPEN_LIMIT,
            cookie_threshold=2,
            dpd_delay=30.0 if option & 0x10 else 0.0,
        )
        self.ini = IkeSa.initiator(self.ini_cfg, self.now, Stream(b"initiator"))
        self.natt = False
        self._forged = 0  # forged messages so far (their IVs)

    def _event(self, handle: SaHandle, event: Event) -> None:
        self.events.append(event)

    # ------------------------------------------------------------------ delivery
    def to_endpoint(self, data: bytes, natt: bool | None = None) -> None:
        natt = self.natt if natt is None else natt
        src = (I_ADDR[0], 4500 if natt else 500)
        self.ep._datagram(R_IP, natt, NON_ESP_MARKER + data if natt else data, src)

    def from_endpoint(self) -> None:
        for data, raw, remote in self.check_sent():
            if remote[0] == I_ADDR[0] and not raw:
                self.ini.receive_datagram(data, self.now, R_ADDR)

    def check_sent(self) -> list[tuple[bytes, bool, tuple[str, int]]]:
        sent, self.ep.sent = self.ep.sent, []
        for data, raw, _ in sent:
            if raw:
                assert data == b"\xff", data  # only NAT keepalives go out raw
            else:
                Message.decode(data)
        assert self.ep.half_open_count() <= HALF_OPEN_LIMIT
        return sent

    def honest(self) -> None:
        for d in self.ini.datagrams_to_send():
            self.to_endpoint(d)
        self.from_endpoint()
        while self.ini.next_event() is not None:
            pass

    # ------------------------------------------------------------------ attacks
    def raw(self, body: bytes) -> None:
        """Bytes as they come off the wire (on 4500 the non-ESP marker is the input's)."""
        natt = bool(body[:1] and body[0] & 1)
        self.ep._datagram(R_IP, natt, body[1:], (I_ADDR[0], 4500 if natt else 500))
        self.check_sent()

    def forged_iv(self, cipher: SkCipher) -> bytes:
        """An IV for a forged message, deterministic per input: counters from the top
        half of the range, so they never meet the initiator's AEAD counters (which
        count up from 1 under the same key)."""
        self._forged += 1
        return (2 ** (8 * cipher.iv_len - 1) + self._forged).to_bytes(cipher.iv_len, "big")

    def sealed(self, body: bytes, response: bool) -> None:
        """A message sealed with the initiator's current keys around a fuzzed chain."""
        link = self.ini.link
        keys = link.keys
        if keys is None or len(body) < 5:
            return
        exch = EXCHANGES[body[0] & 3] if body[0] < 0xF0 else body[0]
        flags = (body[1] & 0x38) | HeaderFlag.INITIATOR
        if response:
            flags |= HeaderFlag.RESPONSE
            mid = max(0, link.expect_mid - 1 + struct.unpack("b", body[2:3])[0])
        else:
            flags &= ~HeaderFlag.RESPONSE
            mid = max(0, link.next_mid + struct.unpack("b", body[2:3])[0])
        first, frag, chain = body[3], body[4], body[5:]
        cipher, sk_e, sk_a = keys.send.cipher, keys.send.sk_e, keys.send.sk_a
        iv = self.forged_iv(cipher)
        if frag:  # SKF: fragment frag>>4 of frag&15
            num, total = frag >> 4, frag & 15
            extra = SKF_HEAD.pack(num, total)
            ptype = PayloadType.SKF
        else:
            extra, ptype = b"", PayloadType.SK
        sealed_len = cipher.sealed_len(len(chain))
        body_len = 4 + len(extra) + sealed_len
        hdr = IkeHeader(
            self.ini.spi_i, self.ini.spi_r, ptype, 0x20, exch, flags, mid, 28 + body_len
        )
        head = hdr.encode() + GenericHeader(first, 0, body_len).encode() + extra
        self.to_endpoint(head + cipher.seal(sk_e, sk_a, iv, head, chain))
        if not response and not frag and mid == link.next_mid:
            link.next_mid += 1  # that message ID is used up: the honest side moves on
        self.check_sent()

    def init(self, body: bytes) -> None:
        """An IKE_SA_INIT request with a fuzzed payload chain, from a chosen SPI."""
        if len(body) < 2:
            return
        spi = self.ini.spi_i if body[0] & 1 else bytes([body[0]]) * 8
        chain = body[2:]
        hdr = IkeHeader(
            spi,
            bytes(8),
            body[1],
            0x20,
            ExchangeType.IKE_SA_INIT,
            HeaderFlag.INITIATOR,
            0,
            28 + len(chain),
        )
        self.to_endpoint(hdr.encode() + chain, natt=False)
        self.check_sent()

    def command(self, body: bytes) -> None:
        what = body[0] % 6 if body else 0
        ini, now = self.ini, self.now
        try:
            if what == 0:
                ini.create_child((_ts(I_ADDR[0]),), (_ts(R_IP),), now=now)
            elif what == 1:
                ini.rekey(now)
            elif what == 2:
                children = ini.child_sas()
                if children:
                    ini.rekey_child(children[0].spi_in, now)
            elif what == 3:
                ini.send_liveness_check(now)
            elif what == 4:
                children = ini.child_sas()
                if children:
                    ini.delete_child(children[-1].spi_in, now)
            else:
                ini.delete(now)
        except IkeError:
            pass  # not possible in this state: the honest initiator refuses

    def time(self, body: bytes) -> None:
        step = int.from_bytes(body[:2].ljust(2, b"\0"), "big") / 10
        self.now += step
        self.ep.tick(self.now)
        t = self.ini.get_timer()
        if t is not None and t <= self.now:
            self.ini.handle_timer(self.now)
        self.check_sent()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    run = Run(data[0])
    for op, body in Records(data[1:], MAX_STEPS):
        kind = op % 8
        if kind == HONEST:
            run.honest()
        elif kind == RAW:
            run.raw(body)
        elif kind == SEALED:
            run.sealed(body, response=False)
        elif kind == INIT:
            run.init(body)
        elif kind == TIME:
            run.time(body)
        elif kind == COMMAND:
            run.command(body)
        else:
            run.sealed(body, response=True)


if __name__ == "__main__":
    fuzz_main(test_one_input)
