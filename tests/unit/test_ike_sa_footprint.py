"""What an established IKE SA keeps per peer (docs/footprint.md, ``rss_per_sa_bytes``):
objects that hold no key are shared between IKE SAs, a Child SA keeps no copy of the
selectors its IKE SA was configured with, and the keys stay each SA's own."""

from __future__ import annotations

import ipaddress

from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.selectors import intersect
from tests.ike_pair import configs, establish


def test_two_ike_sas_share_their_keyless_parts_and_not_their_keys() -> None:
    ini_cfg, res_cfg = configs()
    ini1, res1, _, _ = establish(ini_cfg, res_cfg)
    ini2, res2, _, _ = establish(ini_cfg, res_cfg)
    k1, k2 = ini1.link.keys, ini2.link.keys
    assert k1 is not None and k2 is not None
    assert k1.prf is k2.prf
    assert k1.choice is k2.choice
    assert ini1.link.settings is ini2.link.settings
    assert res1.link.settings is res2.link.settings
    assert k1.send.sk_e != k2.send.sk_e and k1.keys.sk_d != k2.keys.sk_d


def test_a_child_sa_keeps_the_configured_selectors_not_copies() -> None:
    ini_cfg, res_cfg = configs()
    _, _, ic, rc = establish(ini_cfg, res_cfg)
    assert ic.ts_local[0] is ini_cfg.local_ts[0] and ic.ts_remote[0] is ini_cfg.remote_ts[0]
    assert rc.ts_local[0] is res_cfg.local_ts[0] and rc.ts_remote[0] is res_cfg.remote_ts[0]


def test_a_one_host_selector_holds_one_address_object() -> None:
    a = ipaddress.ip_address("192.0.2.9")
    host = TrafficSelector.from_range(a, a)
    assert host.start_address is host.end_address and host.start_address == a.packed
    wide = TrafficSelector.for_network("192.0.2.0/24")
    both = intersect(wide, host)
    assert both == host and both is not None and both.start_address is both.end_address
    assert wide.start_address != wide.end_address
