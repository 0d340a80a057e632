"""No key material in any printed form of the IKE core's objects.

Why: one logged repr of an event, an SA or a record would put SK_* or ESP keys into
syslog. After a real in-memory exchange, a Child SA rekey and an IKE SA rekey, every
event and every SA-side object is formatted as repr, str and f-string, and none of
the texts may hold a key (as raw bytes repr or as hex).
"""

from __future__ import annotations

import dataclasses

from oe_router.ike.events import ChildSaEstablished, Event
from oe_router.ike.sa import IkeSa
from tests.ike_pair import configs, establish, events, shuttle


def _keys_of(sa: IkeSa, evs: list[Event]) -> set[bytes]:
    keys: set[bytes] = set()
    nk = sa.negotiated_keys()
    assert nk is not None
    keys |= {getattr(nk.keys, f.name) for f in dataclasses.fields(nk.keys)}
    for e in evs:
        if isinstance(e, ChildSaEstablished):
            keys |= {e.encr_key_in, e.integ_key_in, e.encr_key_out, e.integ_key_out}
    return {k for k in keys if len(k) >= 8}


def _texts(obj: object) -> list[str]:
    return [repr(obj), str(obj), f"{obj}", f"{obj!r}"]


def test_no_key_bytes_in_any_formatted_event_or_sa() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, ic, rc = establish(ini_cfg, res_cfg, seed=11)
    seen: list[Event] = [ic, rc]
    keys = _keys_of(ini, seen) | _keys_of(res, seen)
    ini.rekey_child(ic.spi_in, 5.0)
    shuttle(ini, res, 5.0)
    ini.rekey(7.0)
    shuttle(ini, res, 7.0)
    for sa in (ini, res):
        got = events(sa)
        assert got, "the rekeys produced events"
        seen += got
        keys |= _keys_of(sa, got)
    assert len(keys) >= 12  # SK_* of two IKE SAs per side, ESP keys of two Child SAs
    objects: list[object] = [*seen, ini, res, ini.negotiated_keys(), res.negotiated_keys()]
    objects += ini.child_sas() + res.child_sas()
    objects += [*ini._children.values(), *res._children.values()]  # the records themselves
    for sa in (ini, res):  # the link, its key contexts, retired links, the handshake
        objects += [sa.link, sa.link.keys, sa.handshake, sa.peer, *sa._retired]
    for obj in objects:
        for text in _texts(obj):
            for k in keys:
                assert repr(k) not in text and k.hex() not in text, (type(obj).__name__, text)
