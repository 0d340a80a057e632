"""Key schedule and codec checked against strongSwan charon 5.9.8 (an independent IKEv2).

How these records were made (reproducible with the host's strongswan-charon):
our initiator ran against charon (responder, kernel-libipsec, ECDSA P-256 keys both
ways) on loopback in a private network namespace; charon logged its derived keys at
``ike = 4`` / ``chd = 4``. Each record keeps our DH private value, the two
IKE_SA_INIT messages exactly as they crossed the wire, and charon's logged SK_* and
first-Child-SA ESP keys. Both IKE SA and Child SA were reported ESTABLISHED /
INSTALLED by ``swanctl --list-sas``.

The test re-derives every key from the wire bytes alone and must agree with
charon; it also checks that charon's IKE_SA_INIT response re-encodes byte-exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from oe_router.ike.constants import TransformType
from oe_router.ike.crypto import Ecp256Exchange, KeyExchange, X25519Exchange, sk_cipher
from oe_router.ike.keys import Prf, child_keymat, ike_sa_keys, skeyseed, split_child_keymat
from oe_router.ike.message import Message
from oe_router.ike.payloads import KE, SA, Nonce

CHARON_RECORDS = [
    {
        "name": "gcm-x25519",
        "dh_private": "d83a90408c45bae508c662b2e9b2a1d9a1349e813e37c5b2d519d21c08cf8357",
        "init_request": (
            "e3b68dbf1319f53000000000000000002120220800000000000000e0220000280000002401010003"
            "0300000c01000014800e01000300000802000005000000080400001f28000028001f0000212c182b"
            "0797f593c3d22ca3f6f3246f4a508fc875057d8a2dfb1000c91ed11029000024751a3e1f84a74048"
            "0704700df5c441267980fd93055eeb17a4d2506a8fdf94412900001c00004004c542ab09ce5f5e0e"
            "148d6dda95e13bb70d7ea7532900001c0000400502c8519669c8f5ab38567c821945c56ea23316d0"
            "290000080000402e000000100000402f0002000300040005"
        ),
        "init_response": (
            "e3b68dbf1319f5302f511469653cdc982120222000000000000000f0220000280000002401010003"
            "0300000c01000014800e01000300000802000005000000080400001f28000028001f0000ac4b9e08"
            "828650fb1e9947e7e91c0148ffaa68e161feafd594790dd912f38c3f29000024759ea8215a059501"
            "da08119253ff5902d1114b03a00bd8f8331c4ec00810f6542900001c00004004a1d41b5790a1323a"
            "a8776723806ae05ed3888f7d2900001c00004005bfc51d6c84f3bbfd65d9c82b463530d075cf6830"
            "290000080000402e290000100000402f000200030004000529000008000040220000000800004014"
        ),
        "Sk_d": "a9eb0686fc19f13be37cb7e27c8e051e0cc6c76d763037d6e3279597533fbd5d",
        "Sk_ei": "6f43cbadaea2d4919ebd7f757523a1944a25bfdc6c9006d515959858c49fada221145000",
        "Sk_er": "c712d0e521e3084ae925ae516f0779b624f7e44ec1d0825db2e7503cf82088d3064f4059",
        "Sk_pi": "7cc214b61f9fb8a76102607de494f01d07f40b0b56f53876ea5641428da8c514",
        "Sk_pr": "79f9d3469e2110eb9324da2d6b95dca394676a3660a9f91846229c61bb7b070e",
        "encryption_initiator_key": (
            "387d731143f432905fb980e074068ad40e318bef510b7b1f4578632a1228107a7df585f9"
        ),
        "encryption_responder_key": (
            "2d305bf33edee954a99926c1d5511291fea7642eb00ee74ce35bff0dc384575f1e78efdb"
        ),
    },
    {
        "name": "cbc-ecp256",
        "dh_private": "d12a46ce49544b128ff6e413faa59ddd9bec78fdd28bf967c4a2d2c4eb4bba3f",
        "init_request": (
            "d430fabad4abd57c0000000000000000212022080000000000000108220000300000002c01010004"
            "0300000c0100000c800e01000300000802000005030000080300000c000000080400001328000048"
            "001300007801ed9a6ff0f42c9220e693f407be51d98ec7eaa09a03aa6affef091d6ecb7fae854b60"
            "43c541ad158d6099cade2145cc7af264ac5de3ef09816afb763bd5b7290000248551b194f3558432"
            "7d4872d6808a360210ca8198f6966928cc65d4e300226c242900001c00004004f528734a61b0f835"
            "eea4ddf83dcba0c2ab2187012900001c0000400551b029aa219c5a697b027b10566a44986e81b611"
            "290000080000402e000000100000402f0002000300040005"
        ),
        "init_response": (
            "d430fabad4abd57c16d66de7a2583630212022200000000000000118220000300000002c01010004"
            "0300000c0100000c800e0100030000080300000c0300000802000005000000080400001328000048"
            "00130000760f7f24ec58702e54aa642cd3aceef2c5e67ff87795a67d1cb427bd7d9aad848476cf94"
            "6a63cb1da5f460a9b920596ead3cea1f566f87960ae65a9200a2d3d729000024b1fd369d13bb1f5a"
            "3b102a54ba766a0fa4ae800cd81dc25d9a1d9d525e9d25402900001c0000400448df14bf344cda2a"
            "5464291206d7284a6e03f9262900001c0000400551be6cf8559733a0dc680beb03680e1de1c01a3d"
            "290000080000402e290000100000402f000200030004000529000008000040220000000800004014"
        ),
        "Sk_d": "3b87523efaf3211e8a7213a2bb22da60374d44220feb2231447a187af244d0c4",
        "Sk_ai": "f5daac20d96322c2f026b6fd2f7ff97a2bc9c59d59a6ada5c379f1a926517acd",
        "Sk_ar": "ae553227c9156b8d474d274b7ec692c7fa5dc3eef0dc692015491e1d8bb41112",
        "Sk_ei": "2ccce8a08b6d220e291adeceef9f9a243eaddeb17bd36af651d3030c9e869996",
        "Sk_er": "7d0ce33b85b714d0a7925933c9e55e86fa04fc6c30c90993b03796eead3f4190",
        "Sk_pi": "e7edf4b96531ae7a8cf66c7c37a2e7bc0aa83090178a2fc92f6e4632d2a8a5c7",
        "Sk_pr": "8cf629232cf758a4ebba14286a69c2fe755a0ebb4f0ab17fb4005142536a0e31",
        "encryption_initiator_key": (
            "3c10e168b44e598b11a16c6e8e3a3c489fd1ee2637e8dc9bd6f1970ebc577b55aacc7e1d"
        ),
        "encryption_responder_key": (
            "9c77c381e39fe733fd8ca08c7fa2a73b1fc8be8e0720193024a1b489e5f302e3dbc8208d"
        ),
    },
]


def _only(msg: Message, cls: type[Any]) -> Any:
    found = msg.get(cls)
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("rec", CHARON_RECORDS, ids=lambda r: str(r["name"]))
def test_keys_agree_with_charon(rec: dict[str, str]) -> None:
    req = Message.decode(bytes.fromhex(rec["init_request"]))
    resp_raw = bytes.fromhex(rec["init_response"])
    resp = Message.decode(resp_raw)
    assert resp.encode() == resp_raw  # real charon message, byte-exact round trip
    assert req.spi_i == resp.spi_i and resp.is_response
    sa = _only(resp, SA)
    (prop,) = sa.proposals
    tid = {t.transform_type: t for t in prop.transforms}
    encr, prf_t, dh = tid[TransformType.ENCR], tid[TransformType.PRF], tid[TransformType.DH]
    integ = tid.get(TransformType.INTEG)
    cipher = sk_cipher(encr.transform_id, encr.key_length, integ.transform_id if integ else None)
    prf = Prf(prf_t.transform_id)

    ours: KeyExchange
    if dh.transform_id == 31:
        ours = X25519Exchange.from_private_bytes(bytes.fromhex(rec["dh_private"]))
    else:
        ours = Ecp256Exchange.from_private_value(int(rec["dh_private"], 16))
    assert _only(req, KE).data == ours.public_bytes
    shared = ours.shared_secret(_only(resp, KE).data)
    ni, nr = _only(req, Nonce).data, _only(resp, Nonce).data

    keys = ike_sa_keys(
        prf,
        skeyseed(prf, ni, nr, shared),
        ni,
        nr,
        resp.spi_i,
        resp.spi_r,
        integ_key_len=cipher.integ_key_len,
        encr_key_len=cipher.encr_key_len,
    )
    assert keys.sk_d.hex() == rec["Sk_d"]
    assert keys.sk_ei.hex() == rec["Sk_ei"] and keys.sk_er.hex() == rec["Sk_er"]
    assert keys.sk_pi.hex() == rec["Sk_pi"] and keys.sk_pr.hex() == rec["Sk_pr"]
    assert keys.sk_ai.hex() == rec.get("Sk_ai", "") and keys.sk_ar.hex() == rec.get("Sk_ar", "")

    # First Child SA: charon chose ESP AES-GCM-16-256 (32-byte key + 4-byte salt each way).
    child = split_child_keymat(child_keymat(prf, keys.sk_d, ni, nr, 72), 36, 0)
    assert child.encr_i.hex() == rec["encryption_initiator_key"]
    assert child.encr_r.hex() == rec["encryption_responder_key"]
