"""nftables set elements over nfnetlink: add, delete and flush without an ``nft`` process.

Why: every destination the packet hold decides (``kernel_hold``'s ``known4``) and every
policy the userspace datapath's SPD projection adds (``nft_spd``'s verdict maps) was one
``nft -f`` run: a fork+exec from a ~40 MB daemon and nft's own parse, several ms of CPU
on a router, on the path of a flood of new flows. Here the same change is one netlink
batch (NFNL_MSG_BATCH_BEGIN, NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM, NFNL_MSG_BATCH_END)
on a persistent NETLINK_NETFILTER socket, with every message ACKed and checked. The
kernel applies a batch atomically, as ``nft -f`` does: one refused message aborts all.

The wire format of include/uapi/linux/netfilter/nf_tables.h is declared once, below, as
pyroute2 netlink classes (nla_map tables, one class per message, as in ``nfqueue.py``);
requests are encoded through them, the bytes match what nft 1.0.6 sends (its
``--debug=mnl`` dump, checked in tests/unit/test_nft_setelem.py) except for the
SET_ID attribute nft adds (only meaningful for a set created in the same batch).

Sans-IO core: ``encode_batch`` (changes in, bytes and the map of sequence numbers out),
``parse_acks`` (bytes in, per-message errnos out) and ``check_acks`` (a DatapathError
naming the set and element). The edge is ``SetElemWriter`` (one socket, opened in the
caller's network namespace). Callers keep ``nft -f`` as the fallback when the kernel
cannot take this path (``unsupported``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import field
from typing import Any, Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, nla
from pyroute2.netlink.nfnetlink import nfgen_msg

from oe_router.netns import in_netns
from oe_router.records import record

from .base import DatapathError

__all__ = [
    "Batch",
    "ElemChange",
    "NftSetError",
    "SetElem",
    "SetElemWriter",
    "check_acks",
    "encode_batch",
    "interval",
    "merged",
    "parse_acks",
    "unsupported",
]

NETLINK_NETFILTER: Final = 12
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
NFNETLINK_V0: Final = 0
NFNL_SUBSYS_NFTABLES: Final = 10
NFNL_MSG_BATCH_BEGIN: Final = 0x10  # NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END: Final = 0x11

# --- nf_tables.h -------------------------------------------------------------------
NFT_MSG_NEWSETELEM: Final = 12
NFT_MSG_DELSETELEM: Final = 14
NFPROTO_INET: Final = 1
NFPROTO_IPV4: Final = 2
NFPROTO_IPV6: Final = 10
NFT_SET_ELEM_INTERVAL_END: Final = 0x1
NFTA_LIST_ELEM: Final = 1
# verdicts (netfilter.h, nf_tables.h enum nft_verdicts)
NF_DROP: Final = 0
NF_ACCEPT: Final = 1
NFT_JUMP: Final = -3
NFT_GOTO: Final = -4

#: The most elements one message carries (a nested attribute's length is 16 bits: a
#: known-set element is 32 bytes, a verdict-map element up to 68).
ELEMS_PER_MSG: Final = 512

# One table per nested level, (type, name, class name), header order.
NFTA_VERDICT_MAP: Final = (
    (0, "NFTA_VERDICT_UNSPEC", "none"),
    (1, "NFTA_VERDICT_CODE", "sbe32"),
    (2, "NFTA_VERDICT_CHAIN", "asciiz"),
)
NFTA_DATA_MAP: Final = (
    (0, "NFTA_DATA_UNSPEC", "none"),
    (1, "NFTA_DATA_VALUE", "cdata"),
    (2, "NFTA_DATA_VERDICT", "nft_verdict"),
)
NFTA_SET_ELEM_MAP: Final = (
    (0, "NFTA_SET_ELEM_UNSPEC", "none"),
    (1, "NFTA_SET_ELEM_KEY", "nft_data"),
    (2, "NFTA_SET_ELEM_DATA", "nft_data"),
    (3, "NFTA_SET_ELEM_FLAGS", "be32"),
    (4, "NFTA_SET_ELEM_TIMEOUT", "be64"),  # milliseconds
    (5, "NFTA_SET_ELEM_EXPIRATION", "be64"),
)
NFTA_SET_ELEM_LIST_MAP: Final = (
    (0, "NFTA_SET_ELEM_LIST_UNSPEC", "none"),
    (1, "NFTA_SET_ELEM_LIST_TABLE", "asciiz"),
    (2, "NFTA_SET_ELEM_LIST_SET", "asciiz"),
    (3, "NFTA_SET_ELEM_LIST_ELEMENTS", "*set_elem"),
    (4, "NFTA_SET_ELEM_LIST_SET_ID", "be32"),
)
NFNL_BATCH_MAP: Final = (
    (0, "NFNL_BATCH_UNSPEC", "none"),
    (1, "NFNL_BATCH_GENID", "be32"),
)


class _nested(nla):  # type: ignore[misc]
    """A nested attribute, flagged NLA_F_NESTED as libnftnl flags it."""

    __slots__ = ()
    nla_flags = 0x8000  # NLA_F_NESTED


class _verdict(_nested):
    __slots__ = ()
    nla_map = NFTA_VERDICT_MAP


class _data(_nested):
    __slots__ = ()
    nla_map = NFTA_DATA_MAP
    nft_verdict = _verdict


class _set_elem(_nested):
    __slots__ = ()
    header_type = NFTA_LIST_ELEM | 0x8000  # every element is NFTA_LIST_ELEM, nested
    nla_map = NFTA_SET_ELEM_MAP
    nft_data = _data


class nft_setelem_msg(nfgen_msg):  # type: ignore[misc]
    """NFT_MSG_NEWSETELEM and NFT_MSG_DELSETELEM (family = the table's; no elements: a
    DELSETELEM flushes the set)."""

    __slots__ = ()
    nla_map = NFTA_SET_ELEM_LIST_MAP
    set_elem = _set_elem


class nfnl_batch_msg(nfgen_msg):  # type: ignore[misc]
    """NFNL_MSG_BATCH_BEGIN / NFNL_MSG_BATCH_END (res_id = NFNL_SUBSYS_NFTABLES)."""

    __slots__ = ()
    nla_map = NFNL_BATCH_MAP


def msg_type(nft_msg: int) -> int:
    """The nlmsg_type of an nf_tables message: subsystem in the high byte."""
    return (NFNL_SUBSYS_NFTABLES << 8) | nft_msg


# --- what to write -------------------------------------------------------------------
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@record(frozen=True)
class SetElem:
    """One element as the kernel stores it: a key, and optionally a timeout (seconds,
    sent in ms), a verdict (maps: code and goto/jump chain) and flags (interval end)."""

    key: Address
    timeout: float | None = None
    verdict: tuple[int, str | None] | None = None
    flags: int = 0

    def attrs(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        if self.flags:
            out.append(["NFTA_SET_ELEM_FLAGS", self.flags])
        if self.timeout is not None:
            out.append(["NFTA_SET_ELEM_TIMEOUT", max(1, round(self.timeout * 1000))])
        out.append(["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", self.key.packed]]}])
        if self.verdict is not None:
            code, chain = self.verdict
            v: list[list[Any]] = [["NFTA_VERDICT_CODE", code]]
            if chain is not None:
                v.append(["NFTA_VERDICT_CHAIN", chain])
            out.append(["NFTA_SET_ELEM_DATA", {"attrs": [["NFTA_DATA_VERDICT", {"attrs": v}]]}])
        return out


def interval(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    verdict: tuple[int, str | None] | None = None,
) -> tuple[SetElem, SetElem] | None:
    """A prefix in an interval set or map, as nft writes it: its start (with the
    verdict) and the address after it flagged INTERVAL_END. None when the prefix reaches
    the top of the address space (nft then writes no end element: left to nft)."""
    end = int(net.broadcast_address) + 1
    if end >> net.max_prefixlen:
        return None
    after = ipaddress.ip_address(end) if net.version == 4 else ipaddress.IPv6Address(end)
    return (
        SetElem(net.network_address, verdict=verdict),
        SetElem(after, flags=NFT_SET_ELEM_INTERVAL_END),
    )


@record(frozen=True)
class ElemChange:
    """Add ``elems`` to, or delete them from, one set; delete with no elements = flush.

    ``what`` names the change's owner in errors ("packet hold")."""

    table: str
    set: str
    add: bool
    elems: tuple[SetElem, ...] = ()
    family: int = NFPROTO_INET
    what: str = "nft set"

    def subject(self) -> str:
        fam = {NFPROTO_INET: "inet", NFPROTO_IPV4: "ip", NFPROTO_IPV6: "ip6"}.get(
            self.family, str(self.family)
        )
        return f"set {fam} {self.table} {self.set}"


@record(frozen=True)
class Sent:
    """One message of a batch: its change, its elements, and the offsets (from the
    message's start) of its table and set names and of each element attribute, which
    is how the kernel's extended ACK points at what it refused."""

    change: ElemChange
    elems: tuple[SetElem, ...]
    table_at: int
    set_at: int
    elem_at: tuple[int, ...]

    @classmethod
    def of(cls, ch: ElemChange, elems: tuple[SetElem, ...], msg: bytes) -> Sent:
        top = _walk(msg, NLMSGHDR.size + NFGENMSG_LEN, len(msg))
        return cls(ch, elems, top.get(1, -1), top.get(2, -1), _elem_offsets(msg))


@record
class Batch:
    """An encoded batch: its bytes, and per NLM_F_ACK'd message (by sequence number) the
    change it carries, which of its elements, and where each element's attribute starts
    (offsets from the message's start, as the kernel's extended ACK reports them)."""

    data: bytes
    messages: dict[int, Sent] = field(default_factory=dict)
    begin_seq: int = 0
    end_seq: int = 0


def _encode(cls: type, mtype: int, family: int, res_id: int, flags: int, seq: int,
            attrs: list[list[Any]]) -> bytes:  # fmt: skip
    msg = cls()
    msg["nfgen_family"] = family
    msg["version"] = NFNETLINK_V0
    msg["res_id"] = res_id
    msg["attrs"] = attrs
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR: Final = struct.Struct("=HH")  # len, type
NFGENMSG_LEN: Final = 4


def _elem_offsets(msg: bytes) -> tuple[int, ...]:
    """Where each element attribute of an encoded set-element message starts."""
    off, end = NLMSGHDR.size + NFGENMSG_LEN, len(msg)
    while off + NLATTR.size <= end:
        alen, atype = NLATTR.unpack_from(msg, off)
        if atype & 0x3FFF == 3:  # NFTA_SET_ELEM_LIST_ELEMENTS
            out, inner, stop = [], off + NLATTR.size, off + alen
            while inner + NLATTR.size <= stop:
                out.append(inner)
                inner += (NLATTR.unpack_from(msg, inner)[0] + 3) & ~3
            return tuple(out)
        off += (alen + 3) & ~3
    return ()


def _walk(msg: bytes, start: int, stop: int) -> dict[int, int]:
    """attr type -> offset of its header, for the attributes in msg[start:stop]."""
    out: dict[int, int] = {}
    off = start
    while off + NLATTR.size <= stop:
        alen, atype = NLATTR.unpack_from(msg, off)
        out[atype & 0x3FFF] = off
        off += (alen + 3) & ~3
    return out


@record(frozen=True)
class _Template:
    """A one-element message encoded through the classes, cut where it varies: the
    message up to the element list, one element, where its key and timeout sit."""

    head: bytes  # nlmsghdr .. the ELEMENTS attribute's header (lengths patched per use)
    elem: bytes
    key_at: int
    key_len: int
    timeout_at: int | None


_TEMPLATES: dict[tuple[Any, ...], _Template] = {}


def _template(ch: ElemChange, e: SetElem) -> _Template:
    """The template for ``e``'s shape in ``ch``'s message (cached: encoded once)."""
    shape = (ch.table, ch.set, ch.add, ch.family, e.key.version, e.timeout is not None,
             e.verdict, e.flags)  # fmt: skip
    t = _TEMPLATES.get(shape)
    if t is None:
        msg = _encode_msg(ch, (e,), 0)
        (at,) = _elem_offsets(msg)
        elems_at = at - NLATTR.size
        elen = NLATTR.unpack_from(msg, at)[0]
        elem = msg[at : at + elen]
        inner = _walk(elem, NLATTR.size, elen)
        key_end = inner[1] + NLATTR.unpack_from(elem, inner[1])[0]
        key_at = _walk(elem, inner[1] + NLATTR.size, key_end)[1] + NLATTR.size  # KEY > VALUE
        tmo = inner.get(4)
        t = _Template(
            head=msg[: elems_at + NLATTR.size],
            elem=elem,
            key_at=key_at,
            key_len=len(e.key.packed),
            timeout_at=None if tmo is None else tmo + NLATTR.size,
        )
        if len(_TEMPLATES) > 256:
            _TEMPLATES.clear()
        _TEMPLATES[shape] = t
    return t


_U64: Final = struct.Struct(">Q")


def _fast_msg(ch: ElemChange, chunk: Sequence[SetElem], seq: int) -> bytes:
    """The message built from templates (pyroute2's encoder costs ~80 us an element):
    the head is the same for every element shape of a change, each element comes from
    its own shape's template with its key and timeout written in."""
    t = _template(ch, chunk[0])
    parts = [t.head]
    for e in chunk:
        te = _template(ch, e)
        el = bytearray(te.elem)
        el[te.key_at : te.key_at + te.key_len] = e.key.packed
        if te.timeout_at is not None and e.timeout is not None:
            _U64.pack_into(el, te.timeout_at, max(1, round(e.timeout * 1000)))
        parts.append(bytes(el))
    msg = bytearray(b"".join(parts))
    elems_at = len(t.head) - NLATTR.size
    NLATTR.pack_into(msg, elems_at, len(msg) - elems_at, NLATTR.unpack_from(t.head, elems_at)[1])
    struct.pack_into("=I", msg, 0, len(msg))
    struct.pack_into("=I", msg, 8, seq)
    return bytes(msg)


def _encode_msg(ch: ElemChange, chunk: Sequence[SetElem], seq: int) -> bytes:
    """One set-element message through the declared classes."""
    attrs: list[list[Any]] = [
        ["NFTA_SET_ELEM_LIST_TABLE", ch.table],
        ["NFTA_SET_ELEM_LIST_SET", ch.set],
    ]
    if chunk:
        attrs.append(["NFTA_SET_ELEM_LIST_ELEMENTS", [{"attrs": e.attrs()} for e in chunk]])
    if ch.add:
        mtype, flags = NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    else:
        mtype, flags = NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK
    return _encode(nft_setelem_msg, msg_type(mtype), ch.family, 0, flags, seq, attrs)


def merged(changes: Iterable[ElemChange]) -> list[ElemChange]:
    """Consecutive changes to the same set in the same direction as one (fewer messages
    and ACKs; the order of the elements is kept). Flushes stay apart."""
    out: list[ElemChange] = []
    for ch in changes:
        last = out[-1] if out else None
        if (
            last is not None
            and ch.elems
            and last.elems
            and (last.table, last.set, last.add, last.family, last.what)
            == (ch.table, ch.set, ch.add, ch.family, ch.what)
        ):
            out[-1] = ElemChange(
                ch.table, ch.set, ch.add, last.elems + ch.elems, ch.family, ch.what
            )
        else:
            out.append(ch)
    return out


def encode_batch(changes: Iterable[ElemChange], seq: int = 1, *, fast: bool = True) -> Batch:
    """One nf_tables batch carrying ``changes`` in order (``merged``), every message
    ACKed; large changes are split into messages of ``ELEMS_PER_MSG`` elements. ``fast``:
    elements from per-shape templates (the same bytes; False: each through the classes)."""
    parts: list[bytes] = []
    batch = Batch(b"", begin_seq=seq)
    res = NFNL_SUBSYS_NFTABLES
    parts.append(
        _encode(nfnl_batch_msg, NFNL_MSG_BATCH_BEGIN, socket.AF_UNSPEC, res, NLM_F_REQUEST, seq, [])
    )
    for ch in merged(changes):
        chunks: list[tuple[SetElem, ...]] = [
            ch.elems[i : i + ELEMS_PER_MSG] for i in range(0, len(ch.elems), ELEMS_PER_MSG)
        ] or [()]
        for chunk in chunks:
            seq += 1
            msg = _fast_msg(ch, chunk, seq) if fast and chunk else _encode_msg(ch, chunk, seq)
            parts.append(msg)
            batch.messages[seq] = Sent.of(ch, chunk, msg)
    seq += 1
    parts.append(
        _encode(nfnl_batch_msg, NFNL_MSG_BATCH_END, socket.AF_UNSPEC, res, NLM_F_REQUEST, seq, [])
    )
    batch.end_seq = seq
    batch.data = b"".join(parts)
    return batch


# --- answers -----------------------------------------------------------------------
NLMSG_ERROR: Final = 2
NLM_F_CAPPED: Final = 0x100
NLM_F_ACK_TLVS: Final = 0x200
NLMSGERR_ATTR_MSG: Final = 1
NLMSGERR_ATTR_OFFS: Final = 2


@record(frozen=True)
class Ack:
    """The kernel's answer to one message: errno 0 (done), else its error, the offset of
    the attribute it blamed (extended ACK) and its text, when it gave them."""

    seq: int
    errno: int
    bad_offset: int | None = None
    text: str = ""


def parse_acks(buf: bytes | bytearray | memoryview, size: int | None = None) -> list[Ack]:
    """Every NLMSG_ERROR in a datagram (others are skipped); ValueError if malformed."""
    end = len(buf) if size is None else size
    out: list[Ack] = []
    off = 0
    while off + NLMSGHDR.size <= end:
        length, mtype, flags, _seq, _pid = NLMSGHDR.unpack_from(buf, off)
        if length < NLMSGHDR.size or off + length > end:
            raise ValueError(f"netlink message at offset {off} claims {length} bytes")
        if mtype == NLMSG_ERROR:
            body = off + NLMSGHDR.size
            if length < NLMSGHDR.size + 4 + NLMSGHDR.size:
                raise ValueError("netlink error message too short")
            (err,) = struct.unpack_from("=i", buf, body)
            req_len, _t, _f, req_seq, _p = NLMSGHDR.unpack_from(buf, body + 4)
            bad, text = None, ""
            if flags & NLM_F_ACK_TLVS:
                tlv = body + 4 + (NLMSGHDR.size if flags & NLM_F_CAPPED else (req_len + 3) & ~3)
                stop = off + length
                while tlv + NLATTR.size <= stop:
                    alen, atype = NLATTR.unpack_from(buf, tlv)
                    if alen < NLATTR.size or tlv + alen > stop:
                        break
                    value = bytes(buf[tlv + NLATTR.size : tlv + alen])
                    if atype == NLMSGERR_ATTR_OFFS and len(value) >= 4:
                        bad = struct.unpack_from("=I", value)[0]
                    elif atype == NLMSGERR_ATTR_MSG:
                        text = value.rstrip(b"\0").decode("utf-8", "replace")
                    tlv += (alen + 3) & ~3
            out.append(Ack(req_seq, -err, bad, text))
        off += (length + 3) & ~3
    return out


#: What an errno means for a set-element change.
_MEANING: Final = {
    errno.ENOENT: "no such table, set or element",  # refined by the ACK's offset
    errno.EEXIST: "element exists or overlaps an interval",
    errno.ENOSPC: "set full",
    errno.ENFILE: "set full",
    errno.EINVAL: "invalid element (type, length or flags)",
    errno.ENOTEMPTY: "element overlaps another",
    errno.EOPNOTSUPP: "not supported by this kernel",
    errno.EPERM: "not permitted (needs CAP_NET_ADMIN)",
}


class NftSetError(DatapathError):
    """The kernel refused a set-element batch (nothing of it was applied); ``errno``."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def _describe(elem: SetElem) -> str:
    return f"interval end {elem.key}" if elem.flags & NFT_SET_ELEM_INTERVAL_END else str(elem.key)


def check_acks(batch: Batch, acks: Iterable[Ack]) -> None:
    """Raise NftSetError for the first refused message, naming its set and element."""
    for ack in acks:
        if not ack.errno:
            continue
        name = errno.errorcode.get(ack.errno, str(ack.errno))
        meaning = _MEANING.get(ack.errno, os.strerror(ack.errno))
        known = batch.messages.get(ack.seq)
        if known is None:
            raise NftSetError(ack.errno, f"nf_tables batch refused: {meaning} ({name})")
        ch, elems, offsets = known.change, known.elems, known.elem_at
        if ack.errno == errno.ENOENT and ack.bad_offset in (known.table_at, known.set_at):
            meaning = "no such table" if ack.bad_offset == known.table_at else "no such set"
        elif ack.errno == errno.ENOENT and ack.bad_offset in offsets:
            meaning = "no such element"
        if ack.bad_offset in offsets:
            which = f"element {_describe(elems[offsets.index(ack.bad_offset)])}"
        elif len(elems) == 1:
            which = f"element {_describe(elems[0])}"
        elif elems:
            which = f"{len(elems)} elements from {_describe(elems[0])}"
        else:
            which = "flush"
        detail = f": {ack.text}" if ack.text else ""
        raise NftSetError(
            ack.errno, f"{ch.what}: {ch.subject()}: {which}: {meaning} ({name}){detail}"
        )


#: errnos that say this kernel (or sandbox) cannot take set elements over netlink at
#: all, rather than refusing this change: the caller falls back to ``nft -f``.
_UNSUPPORTED: Final = frozenset(
    {errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOSYS}
)


def unsupported(exc: BaseException) -> bool:
    """True for an error that means "use nft instead" (no nfnetlink, no nf_tables)."""
    return isinstance(exc, OSError | NftSetError) and getattr(exc, "errno", None) in _UNSUPPORTED


# --- the edge ------------------------------------------------------------------------
class SetElemWriter:
    """A persistent NETLINK_NETFILTER socket in ``netns`` that applies set-element batches
    and waits for their ACKs (blocking, thread-safe: call it from a worker thread)."""

    def __init__(self, *, netns: str | None = None, timeout: float = 5.0) -> None:
        self._netns = netns
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._seq = int(time.time()) & 0xFFFFFF
        self._lock = threading.Lock()
        self._buf = bytearray(1 << 16)
        self.batches = 0  # sent and ACKed, for tests and benches

    def _socket(self) -> socket.socket:
        if self._sock is None:
            with in_netns(self._netns):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                sock.bind((0, 0))
                for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):  # best effort: old kernels
                    with contextlib.suppress(OSError):  # answer without them, less precisely
                        sock.setsockopt(SOL_NETLINK, opt, 1)
                try:  # room for every ACK of a large batch (root may exceed rmem_max)
                    sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)  # SO_RCVBUFFORCE
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.settimeout(self._timeout)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def apply(self, changes: Sequence[ElemChange]) -> None:
        """Send ``changes`` as one atomic batch; NftSetError (nothing applied) if the
        kernel refused any of it, OSError if the socket failed."""
        if not changes:
            return
        with self._lock:
            try:
                self._apply(changes)
            except OSError:
                self.close()  # a fresh socket next time (no stale ACKs to skip)
                raise

    def _apply(self, changes: Sequence[ElemChange]) -> None:
        sock = self._socket()
        batch = encode_batch(changes, seq=self._seq)
        self._seq = (batch.end_seq + 1) & 0xFFFFFFFF or 1
        sock.sendall(batch.data)
        want = set(batch.messages)
        ours = range(batch.begin_seq, batch.end_seq + 1)
        got: list[Ack] = []
        deadline = time.monotonic() + self._timeout
        while want:
            if time.monotonic() > deadline:
                raise NftSetError(errno.ETIMEDOUT, "nf_tables batch: no answer from the kernel")
            try:
                n = sock.recv_into(self._buf)
            except TimeoutError:
                raise NftSetError(
                    errno.ETIMEDOUT, "nf_tables batch: no answer from the kernel"
                ) from None
            for ack in parse_acks(self._buf, n):
                if ack.seq not in ours:
                    continue  # an earlier batch's late answer
                got.append(ack)
                want.discard(ack.seq)
                if ack.errno and ack.seq not in batch.messages:
                    want.clear()  # the batch itself was refused (begin/end)
        check_acks(batch, got)
        self.batches += 1

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
