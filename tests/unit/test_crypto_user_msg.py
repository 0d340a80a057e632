"""NETLINK_CRYPTO wire format and the priority logic, without a kernel.

Requests are checked byte for byte against a layout packed here from
include/uapi/linux/cryptouser.h (struct crypto_user_alg: three char[64] names, then
__u32 type, mask, refcnt, flags); replies are ones recorded from the QEMU lab's router
(Debian 6.1.0-57, `-cpu max`, virtio-crypto), so a wrong table shows up as a wrong
value here. The decision logic of lower_priority runs on a CryptoUser whose socket is
replaced by a table of implementations.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError

from oe_router.offload import crypto_user as C

NLMSGHDR = struct.Struct("=IHHII")
CRU = struct.Struct("=64s64s64sIIII")  # struct crypto_user_alg as the header declares it

# GETALG replies from the lab router's kernel (seq 7, port id 0xe0), one per line of 64 bytes.
VIRTIO_CBC_REPLY = bytes.fromhex(
    "7c0100001300000007000000e0000000636263286165732900000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000076697274696f5f63727970746f5f6165735f636263000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000076697274696f5f63727970746f0000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000200000085040100080001009600000094000400736b636970686572000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000003c6e6f6e653e0000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000010000000100000002000000010000000"
)
AESNI_GCM_REPLY = bytes.fromhex(
    "780100001300000007000000e0000000726663343130362867636d28616573292900000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000726663343130362d67636d2d6165736e6900000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000006165736e695f696e74656c00000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000002000000830400000800010090010000900005006165616400000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000003c6e6f6e653e0000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000010000001000000008000000"
)


def test_crypto_user_alg_is_208_bytes() -> None:
    assert CRU.size == 208
    assert struct.calcsize("=" + "".join(code for _, code in C.CRYPTO_USER_ALG)) == 208


def test_getalg_request_bytes() -> None:
    wire = C.encode(C.CRYPTO_MSG_GETALG, driver="virtio_crypto_aes_cbc", seq=7, pid=0x1234)
    payload = CRU.pack(b"", b"virtio_crypto_aes_cbc", b"", 0, 0, 0, 0)
    assert wire == NLMSGHDR.pack(16 + 208, 0x13, NLM_F_REQUEST, 7, 0x1234) + payload


def test_getalg_dump_request_bytes() -> None:
    wire = C.encode(C.CRYPTO_MSG_GETALG, flags=NLM_F_REQUEST | NLM_F_DUMP)
    assert wire == NLMSGHDR.pack(224, 0x13, NLM_F_REQUEST | NLM_F_DUMP, 0, 0) + bytes(208)


def test_updatealg_request_bytes() -> None:
    wire = C.encode(
        C.CRYPTO_MSG_UPDATEALG,
        driver="cbc-aes-aesni",
        priority=149,
        flags=NLM_F_REQUEST | NLM_F_ACK,
        seq=3,
    )
    payload = CRU.pack(b"", b"cbc-aes-aesni", b"", 0, 0, 0, 0)
    attr = struct.pack("=HHI", 8, C.CRYPTOCFGA_PRIORITY_VAL, 149)  # nla_len, nla_type, __u32
    assert (
        wire == NLMSGHDR.pack(16 + 208 + 8, 0x12, NLM_F_REQUEST | NLM_F_ACK, 3, 0) + payload + attr
    )


def test_decode_recorded_skcipher_reply() -> None:
    alg = C.decode(VIRTIO_CBC_REPLY)
    assert alg == C.CryptoUserAlg(
        name="cbc(aes)",
        driver="virtio_crypto_aes_cbc",
        module="virtio_crypto",
        priority=150,
        flags=0x10485,  # ALLOCATES_MEMORY | TESTED | ASYNC | type 5 (skcipher)
        refcnt=2,
        type="skcipher",
    )
    assert alg.tested and alg.async_ and not alg.internal and alg.usable
    msg = C.crypto_user_msg(bytearray(VIRTIO_CBC_REPLY))
    msg.decode()
    report = msg.get_attr("CRYPTOCFGA_REPORT_BLKCIPHER")
    assert report["geniv"].rstrip(b"\0") == b"<none>"
    assert (report["blocksize"], report["min_keysize"], report["max_keysize"]) == (16, 16, 32)
    assert report["ivsize"] == 16


def test_decode_recorded_aead_reply() -> None:
    alg = C.decode(AESNI_GCM_REPLY)
    assert (alg.name, alg.driver, alg.module) == (
        "rfc4106(gcm(aes))",
        "rfc4106-gcm-aesni",
        "aesni_intel",
    )
    assert (alg.priority, alg.type, alg.flags & C.CRYPTO_ALG_TYPE_MASK) == (400, "aead", 3)
    msg = C.crypto_user_msg(bytearray(AESNI_GCM_REPLY))
    msg.decode()
    report = msg.get_attr("CRYPTOCFGA_REPORT_AEAD")
    assert (report["blocksize"], report["maxauthsize"], report["ivsize"]) == (1, 16, 8)


def test_round_trip_of_a_built_reply() -> None:
    reply = (
        NLMSGHDR.pack(232, 0x13, 0, 1, 0)
        + CRU.pack(b"gcm(aes)", b"gcm-aes-x", b"x_mod", 0, 0, 5, C.CRYPTO_ALG_INTERNAL | 0x400)
        + struct.pack("=HHI", 8, 1, 7)
    )
    alg = C.decode(reply)
    assert (alg.name, alg.driver, alg.module, alg.priority, alg.refcnt) == (
        "gcm(aes)",
        "gcm-aes-x",
        "x_mod",
        7,
        5,
    )
    assert alg.internal and not alg.usable and alg.type == ""


@pytest.mark.parametrize(
    "names", [{"driver": "x" * 64}, {"driver": "a\0b"}, {"name": "x" * 64}, {"driver": "é"}]
)
def test_names_the_kernel_would_refuse(names: dict[str, str]) -> None:
    with pytest.raises(C.CryptoUserError, match="must be 1 to 63 ASCII characters"):
        C.encode(C.CRYPTO_MSG_GETALG, **names)


@pytest.mark.parametrize("prio", [-1, 0x80000000])
def test_priority_out_of_range(prio: int) -> None:
    with pytest.raises(C.CryptoUserError, match=f"priority {prio} outside 0..2147483647"):
        C.encode(C.CRYPTO_MSG_UPDATEALG, driver="d", priority=prio)


def test_missing_module_names_crypto_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2.netlink.nlsocket as nlsocket

    class NoFamily:
        def __init__(self, **kw: Any) -> None:
            raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(nlsocket, "NetlinkSocket", NoFamily)
    with pytest.raises(C.CryptoUserError, match=r"load crypto_user \(CONFIG_CRYPTO_USER\)"):
        C.get_alg("cbc-aes-aesni")


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (errno.ENOENT, "no crypto driver named 'zzz' in the kernel"),
        (errno.EPERM, "needs CAP_NET_ADMIN"),
        (errno.EINVAL, "refused the request"),
    ],
)
def test_kernel_errors_name_the_driver(code: int, text: str) -> None:
    err = C._explain(NetlinkError(code), "zzz", "setting the priority of")
    assert text in str(err) and "zzz" in str(err) and err.errno == code


# --- lower_priority's decisions, on a table instead of a socket --------------------------
def alg(driver: str, prio: int, name: str = "cbc(aes)", flags: int = 0x405) -> C.CryptoUserAlg:
    return C.CryptoUserAlg(name, driver, "m", prio, flags, 1, "skcipher")


class TableCryptoUser(C.CryptoUser):
    """CryptoUser over a dict of implementations; records UPDATEALG calls."""

    def __init__(self, *algs: C.CryptoUserAlg) -> None:
        self.table = {a.driver: a for a in algs}
        self.updates: list[tuple[str, int]] = []

    def close(self) -> None:
        pass

    def get_alg(self, driver: str) -> C.CryptoUserAlg:
        if driver not in self.table:
            raise C._explain(NetlinkError(errno.ENOENT), driver, "reading")
        return self.table[driver]

    def algorithms(self) -> tuple[C.CryptoUserAlg, ...]:
        return tuple(self.table.values())

    def _update(self, driver: str, priority: int) -> None:
        self.updates.append((driver, priority))
        old = self.get_alg(driver)
        self.table[driver] = C.CryptoUserAlg(
            old.name, old.driver, old.module, priority, old.flags, old.refcnt, old.type
        )


def test_raising_a_driver_repicks_the_ones_it_now_outranks() -> None:
    cu = TableCryptoUser(
        alg("cbc-aes-aesni", 400), alg("virtio_crypto_aes_cbc", 150), alg("cbc(aes-generic)", 100),
        alg("cbc-aes-faster", 900), alg("gcm-aes-aesni", 400, name="gcm(aes)"),
    )  # fmt: skip
    assert cu.set_priority("virtio_crypto_aes_cbc", 401).priority == 401
    assert cu.updates == [
        ("virtio_crypto_aes_cbc", 401),
        ("cbc-aes-aesni", 400),  # same priority: only its instances (authenc(...)) go
        ("cbc(aes-generic)", 100),
    ]
    cu.updates.clear()
    cu.set_priority("virtio_crypto_aes_cbc", 150, repick=False)
    assert cu.updates == [("virtio_crypto_aes_cbc", 150)]


def test_lower_priority_goes_one_below_the_best_other_implementation() -> None:
    cu = TableCryptoUser(
        alg("safexcel-cbc-aes", 350),
        alg("cbc-aes-neon", 250),
        alg("cbc(aes-generic)", 100),
        alg("__cbc-aes-internal", 900, flags=0x2405),  # internal: never the pick
        alg("cbc-aes-untested", 800, flags=0x005),  # not tested: never the pick
        alg("gcm-other", 1000, name="gcm(aes)"),
    )
    assert cu.lower_priority("safexcel-cbc-aes").priority == 249
    assert cu.updates == [("safexcel-cbc-aes", 249)]
    assert cu.implementations("cbc(aes)")[0].driver == "cbc-aes-neon"


def test_lower_priority_below_a_named_driver() -> None:
    cu = TableCryptoUser(alg("hw", 300), alg("a", 200), alg("b", 100))
    assert cu.lower_priority("hw", below="b").priority == 99


def test_lower_priority_leaves_a_driver_already_below() -> None:
    cu = TableCryptoUser(alg("hw", 100), alg("cpu", 300))
    assert cu.lower_priority("hw").priority == 100
    assert cu.updates == []


def test_lower_priority_refuses_when_nothing_else_implements_it() -> None:
    cu = TableCryptoUser(alg("hw", 300), alg("other", 500, name="ecb(aes)"))
    with pytest.raises(C.CryptoUserError, match="only usable implementation of 'cbc\\(aes\\)'"):
        cu.lower_priority("hw")


def test_lower_priority_refuses_a_driver_of_another_algorithm() -> None:
    cu = TableCryptoUser(alg("hw", 300), alg("other", 500, name="ecb(aes)"))
    with pytest.raises(C.CryptoUserError, match="implements 'ecb\\(aes\\)'"):
        cu.lower_priority("hw", below="other")


def test_lower_priority_refuses_below_zero() -> None:
    cu = TableCryptoUser(alg("hw", 300), alg("floor", 0))
    with pytest.raises(C.CryptoUserError, match="priority 0, nothing ranks below"):
        cu.lower_priority("hw")


def test_lower_priority_unknown_driver() -> None:
    cu = TableCryptoUser(alg("hw", 300))
    with pytest.raises(C.CryptoUserError, match="no crypto driver named 'nope'"):
        cu.lower_priority("nope")
