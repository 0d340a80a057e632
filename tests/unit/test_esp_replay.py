"""Anti-replay (RFC 4303 §3.4.3, Appendix A) of datapath.esp.InboundSa against a model.

The model is the rule itself on full 64-bit sequence numbers: a set of the numbers that
got through (0 counts as seen) and the window rule "newer than the highest, or within
W of it and not seen". Packets are real ESP packets sealed at the chosen numbers, so the
SA under test sees only the low 32 bits with ESN and must infer the rest.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.datapath.esp import (
    EspError,
    InboundSa,
    IntegrityFailed,
    OutboundSa,
    Replayed,
)
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.software import SoftwareEngine

ENGINE = SoftwareEngine()
T = TRANSFORMS["aes128gcm16"]
KEY = bytes(range(20))
CIPHER = ENGINE.cipher(T, KEY)
SPI = 0xABCD
EPOCH = 1 << 32


def packet_at(seq: int, *, esn: bool) -> bytes:
    """An ESP packet carrying b"\x45inner" at ``seq`` (0 too, which no OutboundSa sends)."""
    if seq:
        return OutboundSa(SPI, CIPHER, esn=esn, first_seq=seq).seal(b"\x45inner", 4)
    hdr = SPI.to_bytes(4, "big") + bytes(4)
    return hdr + bytes(8) + CIPHER.seal(hdr, 0 if esn else None, bytes(8), b"\x45inner\0\4")


class Model:
    """What RFC 4303 §3.4.3 accepts: seen set + window rule on 64-bit numbers."""

    def __init__(self, window: int, top: int = 0) -> None:
        self.window = window
        self.seen = {top}
        self.top = top

    def offer(self, seq: int) -> bool:
        if self.window == 0:
            ok = True
        else:
            ok = seq > self.top or (self.top - seq < self.window and seq not in self.seen)
        if ok:
            self.seen.add(seq)
            self.top = max(self.top, seq)
        return ok


def run(sa: InboundSa, seq: int, *, esn: bool) -> bool:
    try:
        nh, inner = sa.open(packet_at(seq, esn=esn))
    except EspError:
        return False
    assert (nh, inner) == (4, b"\x45inner")
    return True


@pytest.mark.parametrize("window", [1, 2, 32, 64, 100, 1000])
@settings(max_examples=60)
@given(seqs=st.lists(st.integers(0, 1500), min_size=1, max_size=60))
def test_window_equals_model_without_esn(window: int, seqs: list[int]) -> None:
    sa = InboundSa(SPI, CIPHER, esn=False, replay_window=window)
    model = Model(window)
    for s in seqs:
        assert run(sa, s, esn=False) == model.offer(s), s
    assert sa.highest_seq == model.top
    assert sa.packets == len(model.seen) - 1  # 0 was "seen" from the start


@pytest.mark.parametrize("window", [1, 32, 64, 256, 4096])
@settings(max_examples=60)
@given(
    start=st.sampled_from([0, EPOCH - 3, EPOCH - 300, 5 * EPOCH - 1, 7 * EPOCH + 10]),
    steps=st.lists(st.integers(-5000, 3000), min_size=1, max_size=50),
)
def test_esn_window_equals_model_across_2_32(window: int, start: int, steps: list[int]) -> None:
    """Numbers up to 2^31 ahead or within the window are inferred right; older ones are
    inferred into the next epoch, fail the ICV, and the model drops them too."""
    sa = InboundSa(SPI, CIPHER, esn=True, replay_window=window, highest_seq=start)
    model = Model(window, start)
    for step in steps:
        s = model.top + step
        if s < 0:
            continue
        assert run(sa, s, esn=True) == model.offer(s), (s, model.top)
    assert sa.highest_seq == model.top


def test_esn_inference_cases_of_appendix_a2() -> None:
    w = 64
    # window inside one epoch (Tl >= W - 1): a low number is the next epoch
    sa = InboundSa(SPI, CIPHER, esn=True, replay_window=w, highest_seq=3 * EPOCH + 1000)
    assert run(sa, 3 * EPOCH + 1000 - 63, esn=True)  # inside the window: same epoch
    assert run(sa, 4 * EPOCH + 5, esn=True)  # wrapped: next epoch
    assert sa.highest_seq == 4 * EPOCH + 5
    # window spans two epochs (Tl < W - 1): a high number is the previous epoch
    sa = InboundSa(SPI, CIPHER, esn=True, replay_window=w, highest_seq=3 * EPOCH + 10)
    assert run(sa, 3 * EPOCH - 20, esn=True)
    assert run(sa, 3 * EPOCH + 11, esn=True)
    assert not run(sa, 3 * EPOCH - 20, esn=True) and sa.replay_errors == 1


def test_window_of_4096_bits() -> None:
    sa = InboundSa(SPI, CIPHER, esn=False, replay_window=4096)
    assert run(sa, 5000, esn=False)
    assert run(sa, 5000 - 4095, esn=False)  # the oldest number still inside
    assert not run(sa, 5000 - 4096, esn=False) and sa.replay_window_errors == 1
    assert not run(sa, 5000 - 4095, esn=False) and sa.replay_errors == 1
    assert run(sa, 9096, esn=False) and run(sa, 5001, esn=False)  # 4095 behind the new top
    assert not run(sa, 4999, esn=False) and sa.replay_window_errors == 2


def test_window_moves_only_after_the_icv_verified() -> None:
    sa = InboundSa(SPI, CIPHER, esn=False, replay_window=32)
    forged = bytearray(packet_at(1000, esn=False))
    forged[-1] ^= 1
    with pytest.raises(IntegrityFailed):
        sa.open(bytes(forged))
    assert sa.highest_seq == 0 and sa.integrity_failures == 1
    assert run(sa, 5, esn=False)  # would be far left of a window moved to 1000
    # ESN: a forged low half that infers the next epoch fails and moves nothing
    esn = InboundSa(SPI, CIPHER, esn=True, replay_window=32, highest_seq=EPOCH - 1)
    with pytest.raises(IntegrityFailed):
        esn.open(packet_at(EPOCH - 100, esn=True)[:4] + (7).to_bytes(4, "big") + b"\0" * 40)
    assert esn.highest_seq == EPOCH - 1
    assert run(esn, EPOCH - 5, esn=True)


def test_duplicates_and_too_old_are_counted_apart() -> None:
    sa = InboundSa(SPI, CIPHER, esn=False, replay_window=8)
    assert run(sa, 20, esn=False)
    with pytest.raises(Replayed) as dup:
        sa.open(packet_at(20, esn=False))
    with pytest.raises(Replayed) as old:
        sa.open(packet_at(12, esn=False))
    assert not dup.value.too_old and old.value.too_old
    assert (sa.replay_errors, sa.replay_window_errors) == (1, 1)
    with pytest.raises(Replayed):
        sa.open(packet_at(0, esn=False))  # sequence number 0 is never sent


def test_window_zero_turns_the_check_off_like_xfrm() -> None:
    sa = InboundSa(SPI, CIPHER, esn=False, replay_window=0)
    for s in (5, 5, 1, 0, 5):
        assert run(sa, s, esn=False)
    assert sa.packets == 5 and sa.highest_seq == 5


def test_epoch_before_zero_and_after_the_last_are_refused() -> None:
    # top 10, W 64: a low half near 2^32 would be epoch -1: no sender can make it
    sa = InboundSa(SPI, CIPHER, esn=True, replay_window=64, highest_seq=10)
    with pytest.raises(Replayed):
        sa.open(SPI.to_bytes(4, "big") + (EPOCH - 5).to_bytes(4, "big") + bytes(40))
    top = (1 << 64) - 10
    last = InboundSa(SPI, CIPHER, esn=True, replay_window=64, highest_seq=top)
    with pytest.raises(Replayed):  # would be epoch 2^32: past the last number
        last.open(SPI.to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(40))
    assert run(last, (1 << 64) - 1, esn=True)
