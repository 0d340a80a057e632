"""Fuzz target: IKE datagram decoding (header, payload chain, every payload body).

Input: a datagram as it arrives on UDP 500. Also decoded as a bare payload chain (the
first byte names the first payload), which is what a decrypted SK body is. Oracle: only
IkeDecodeError may come out, and whatever decodes re-encodes to an equal message.
"""

from __future__ import annotations

from fuzz.common import fuzz_main, instrumented

with instrumented():
    from oe_router.ike.errors import IkeDecodeError
    from oe_router.ike.message import Message, decode_chain, encode_chain
    from oe_router.ike.payloads import IkeHeader
    from oe_router.ike.wire import Reader


def test_one_input(data: bytes) -> None:
    try:
        hdr = IkeHeader.read(Reader(data[:28]))
    except IkeDecodeError:
        hdr = None
    try:
        msg = Message.decode(data)
    except IkeDecodeError:
        pass
    else:
        assert hdr is not None, "a message decoded whose header did not"
        again = Message.decode(msg.encode())
        assert again == msg, f"re-encoding changed the message: {msg} -> {again}"
    if data:
        try:
            chain, _ = decode_chain(data[1:], data[0])
        except IkeDecodeError:
            return
        back, _ = decode_chain(encode_chain(chain), data[0] if chain else 0)
        assert back == chain, f"re-encoding changed the chain: {chain} -> {back}"


if __name__ == "__main__":
    fuzz_main(test_one_input)
