"""Regenerate the committed seed corpora under fuzz/corpus/<target>/.

Usage: ``python -m fuzz.seeds [target ...]`` (default: all). Seeds are valid inputs made
by the project's own encoders: IKE messages from a deterministic exchange between our
initiator and our responder, DNS replies from zones signed here with dnspython, the UCI
files of tests/unit/configs, and control requests. Each seed is named by what it is, so
a diff of the corpus reads as a list. Crash reproducers added as regression seeds are
named ``regress-*`` and are never removed by this script.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fuzz.common import record
from fuzz.run import CORPUS, ROOT

Seeds = dict[str, bytes]


def write(target: str, seeds: Seeds) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        if not old.name.startswith("regress-"):
            old.unlink()
    for name, data in seeds.items():
        (d / name).write_bytes(data)
    print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


# --------------------------------------------------------------------------- IKE


def _ike_messages() -> tuple[dict[str, bytes], dict[str, bytes], Seeds]:
    """(datagrams, plaintext chains as first-type byte + chain, ike_sa step scripts)."""
    from fuzz.targets import ike_sa as t
    from oe_router.ike.message import Message, decode_chain, decrypt, encode_chain, payload_type
    from oe_router.ike.payloads import SKF

    H, S, C, TM = t.HONEST, t.SEALED, t.COMMAND, t.TIME
    datagrams: dict[str, bytes] = {}
    chains: dict[str, bytes] = {}
    scripts: Seeds = {}

    def peek(run: t.Run, name: str) -> tuple[int, int, bytes] | None:
        """Take the initiator's next request; keep it and its plaintext chain."""
        out = run.ini.datagrams_to_send()
        if not out:
            return None
        for i, d in enumerate(out):
            datagrams[name + (f"-fragment-{i + 1}" if len(out) > 1 else "")] = d
        keys = run.ini.link.keys
        if keys is None:
            return None
        cipher, sk_e, sk_a = keys.send.cipher, keys.send.sk_e, keys.send.sk_a
        if len(out) > 1:  # SKF fragments: open each, join, parse (RFC 7383 §2.6)
            plain, first_inner = b"", 0
            for d in out:
                skf = Message.decode(d).payloads[-1]
                assert isinstance(skf, SKF)
                first_inner = first_inner or skf.first_inner
                plain += cipher.open(sk_e, sk_a, d[: len(d) - len(skf.data)], skf.data)
            msg = Message.decode(out[0])
            msg.payloads, _ = decode_chain(plain, first_inner)
        else:
            msg = decrypt(out[0], cipher, sk_e, sk_a)
        first = payload_type(msg.payloads[0]) if msg.payloads else 0
        chain = encode_chain(msg.payloads)
        chains[name] = bytes([first]) + chain
        return msg.exchange_type, first, chain

    def sealed(exch: int, first: int, chain: bytes, delta: int = 0) -> bytes:
        """SEALED of a captured chain; ``delta`` -1 when the initiator has already used
        the message ID for its own (queued, undelivered) request."""
        code = t.EXCHANGES.index(exch) if exch in t.EXCHANGES else exch
        return record(S, bytes([code, 0, delta & 0xFF, first, 0]) + chain)

    options = {
        "x25519": 0x00,
        "ecp256": 0x01,
        "modp": 0x02,
        "signed": 0x04,
        "frag-cp": 0x28,
        "lifetimes": 0x10,
        "cbc": 0x40,
        "transport": 0x80,
    }
    for oname, opt in options.items():
        scripts[f"establish-{oname}"] = bytes([opt]) + record(H) * 3
        # capture every honest message along the way
        run = t.Run(opt)
        first = run.ini.datagrams_to_send()[0]
        datagrams[f"init-request-{oname}"] = first
        run.to_endpoint(first)
        for payload, _, _ in run.ep.sent:
            datagrams[f"init-response-{oname}"] = payload
        run.from_endpoint()
        auth = peek(run, f"auth-request-{oname}")
        if auth is not None:
            exch, f, chain = auth
            steps = record(H) + sealed(exch, f, chain, -1)
            scripts[f"sealed-auth-{oname}"] = bytes([opt]) + steps
    # established, then each command, captured as honest and as sealed plaintext
    commands = ["create-child", "rekey-ike", "rekey-child", "liveness", "delete-child"]
    for cmd, cname in enumerate([*commands, "delete-ike"]):
        opt = 0x28 if cname == "create-child" else 0x00
        run = t.Run(opt)
        run.honest(), run.honest(), run.honest()
        run.command(bytes([cmd]))
        got = peek(run, f"{cname}-request")
        steps = record(H) * 3 + record(C, bytes([cmd])) + record(H) * 2
        scripts[f"command-{cname}"] = bytes([opt]) + steps
        if got is not None:
            exch, f, chain = got
            scripts[f"sealed-{cname}"] = bytes([opt]) + record(H) * 3 + sealed(exch, f, chain)
    scripts["lifetimes-timers"] = (
        bytes([0x10]) + record(H) * 3 + (record(TM, (3000).to_bytes(2, "big")) + record(H)) * 6
    )
    scripts["retransmit-timeout"] = bytes([0]) + record(TM, (50).to_bytes(2, "big")) * 8
    init = datagrams["init-request-x25519"]
    scripts["raw-init"] = bytes([0]) + record(t.RAW, b"\0" + init) + record(H)
    scripts["raw-init-natt"] = bytes([0]) + record(t.RAW, b"\1" + bytes(4) + init)
    scripts["raw-keepalive"] = bytes([0]) + record(t.RAW, b"\1\xff")
    scripts["init-chain"] = bytes([0]) + record(t.INIT, bytes([1, init[16]]) + init[28:])
    scripts["init-flood"] = bytes([0]) + b"".join(
        record(t.INIT, bytes([2 * i, init[16]]) + init[28:]) for i in range(6)
    )
    return datagrams, chains, scripts


def ike() -> None:
    datagrams, chains, scripts = _ike_messages()
    decode: Seeds = {f"dgram-{k}": v for k, v in datagrams.items()}
    decode.update({f"chain-{k}": v for k, v in chains.items()})
    write("ike_decode", decode)
    pre: Seeds = {}
    for k, v in datagrams.items():
        if k.startswith("init-request"):
            for half_open in (0, 3, 9):
                pre[f"{k}-half-open-{half_open}"] = bytes([half_open, 0, half_open & 1]) + v
    write("ike_precheck", pre)
    write("ike_sa", scripts)


# --------------------------------------------------------------------------- DNS

#: what the dns_validate seeds ask: secure answers, CNAME, wildcard, NSEC and NSEC3
#: denials, opt-out, an insecure delegation and an unsupported algorithm
QUESTIONS = [
    ("host.example.test.", "IPSECKEY"),
    ("host.example.test.", "A"),
    ("www.example.test.", "A"),
    ("nokey.example.test.", "IPSECKEY"),
    ("missing.example.test.", "IPSECKEY"),
    ("x.wild.example.test.", "A"),
    ("a.deep.example.test.", "A"),
    ("host.other.test.", "IPSECKEY"),
    ("host.n3.test.", "IPSECKEY"),
    ("missing.n3.test.", "A"),
    ("x.wild.n3.test.", "A"),
    ("host.unsigned.optout.test.", "A"),
    ("host.insecure.test.", "IPSECKEY"),
    ("host.p384.test.", "A"),
]


def dns_seeds() -> None:
    """Sign the unit tests' zones (tests/dnssec_world.py's make_world) once and record
    every reply a validation of QUESTIONS needs."""
    import json

    import dns.flags
    import dns.message
    from tests import dnssec_world as unit

    from fuzz.targets import dns_validate as t
    from oe_router.dns.dnssec import Query, Validator, drive, load_trust_anchors

    world = unit.make_world(unit.make_keys())
    replies: dict[str, str] = {}
    order: dict[tuple[str, str], list[tuple[Query, bytes]]] = {}

    for qname, rdtype in QUESTIONS:
        asked: list[tuple[Query, bytes]] = []

        def answer(q: Query, asked: list[tuple[Query, bytes]] = asked) -> dns.message.Message:
            msg = world.answer(q)
            assert msg is not None
            wire = msg.to_wire()
            replies[str(q)] = wire.hex()
            asked.append((q, wire))
            return msg

        v = Validator(load_trust_anchors(world.anchor))
        result = drive(v.start(qname, rdtype, unit.NOW), answer, lambda: unit.NOW)
        print(f"  {qname}/{rdtype}: {result.status.value} ({len(asked)} queries)")
        order[(qname, rdtype)] = asked
    data = ROOT / "fuzz" / "data"
    data.mkdir(exist_ok=True)
    doc = {
        "now": unit.NOW,
        "anchor": world.anchor,
        "questions": QUESTIONS,
        "replies": dict(sorted(replies.items())),
    }
    (data / "dns_validate.json").write_text(json.dumps(doc, indent=1) + "\n")

    seeds: Seeds = {}
    for i, ((qname, rdtype), asked) in enumerate(order.items()):
        base = f"{qname.rstrip('.')}-{rdtype}"
        seeds[f"{base}-honest"] = bytes([i])
        for n, (q, wire) in enumerate(asked):
            honest = record(t.HONEST) * n
            seeds[f"{base}-wire-{n}-{q.rdtype.name}"] = bytes([i]) + honest + record(t.WIRE, wire)
        seeds[f"{base}-expired"] = bytes([i | 4 << 5])
        seeds[f"{base}-silent-last"] = (
            bytes([i]) + record(t.HONEST) * (len(asked) - 1) + record(t.SILENCE)
        )
    write("dns_validate", seeds)

    wire_seeds: Seeds = {}
    for key, hexwire in replies.items():
        wire_seeds["reply-" + key.replace("/", "-").strip(".-") or "root"] = bytes.fromhex(hexwire)
    for name, rdtype, edns, flags in [
        ("host.example.test.", "A", -1, 0),
        ("host.example.test.", "IPSECKEY", 0, 0),
        ("Host.Example.TEST.", "AAAA", 0, dns.flags.CD),
        (".", "NS", -1, 0),
    ]:
        q = dns.message.make_query(name, rdtype, use_edns=edns, want_dnssec=edns >= 0)
        q.flags |= flags
        wire_seeds[f"query-{name.strip('.') or 'root'}-{rdtype}"] = q.to_wire()
    write("dns_wire", wire_seeds)


# --------------------------------------------------------------------------- UCI, control


def uci() -> None:
    """The unit tests' config files, good and bad, and the packaged default config."""
    seeds: Seeds = {}
    for path in sorted((ROOT / "tests" / "unit" / "configs").rglob("*.conf")):
        seeds[f"{path.parent.name}-{path.stem}"] = path.read_bytes()
    seeds["packaged-default"] = (ROOT / "files" / "etc" / "config" / "oe").read_bytes()
    write("uci", seeds)


def control() -> None:
    """Requests as the oe CLI sends them, plus a few the protocol must refuse."""
    import json

    requests = {
        "status": {"cmd": "status"},
        "help": {"cmd": "help"},
        "reload": {"cmd": "reload"},
        "up": {"cmd": "up", "peer": "192.0.2.7"},
        "down": {"cmd": "down", "peer": "2001:db8::7"},
        "offload": {"cmd": "offload"},
        "offload-bench": {"cmd": "offload-bench", "seconds": 0.5},
        "status-args": {"cmd": "status", "verbose": True, "n": [1, 2.5, None, {"a": "b"}]},
        "unknown": {"cmd": "frobnicate"},
        "no-cmd": {"peer": "x"},
    }
    seeds: Seeds = {k: (json.dumps(v) + "\n").encode() for k, v in requests.items()}
    seeds["not-json"] = b"status\n"
    seeds["not-object"] = b'["status"]\n'
    seeds["duplicate-key"] = b'{"cmd":"status","cmd":"down"}\n'
    seeds["nested"] = b'{"cmd":"status","a":' + b"[" * 40 + b"]" * 40 + b"}\n"
    seeds["constant"] = b'{"cmd":"up","peer":NaN}\n'
    seeds["escapes"] = b'{"cmd":"st\\u0061tus","x":"\\ud800\\n"}\n'
    write("control", seeds)


TARGETS: dict[str, Callable[[], None]] = {
    "ike": ike,
    "dns": dns_seeds,
    "uci": uci,
    "control": control,
}


def main(argv: list[str]) -> int:
    wanted = argv or list(TARGETS)
    for name in wanted:
        TARGETS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
