"""PFS in CREATE_CHILD_SA against peers with other DH policies (found against charon).

Why: charon with ``esp_proposals = aes256gcm16-modp2048`` on an X25519 IKE SA, or
with no DH group at all (strongSwan's default), refused every rekey of ours with
NO_PROPOSAL_CHOSEN (we offered the IKE SA's group only and insisted on PFS), so
our Child SAs would have expired instead of being rekeyed.
"""

from __future__ import annotations

from typing import Any

import pytest

from oe_router.ike.constants import DhId, TransformType
from oe_router.ike.events import ChildSaDeleted, ChildSaRekeyed
from oe_router.ike.payloads import KE, SA
from oe_router.ike.proposals import select_child_proposal
from oe_router.ike.tasks import child_sa
from tests.ike_pair import (
    I_ADDR,
    assert_mirror,
    configs,
    establish,
    events,
    open_request,
    shuttle,
)


def test_rekey_offers_every_group_with_the_ike_sas_first() -> None:
    ini, _res, ic, _rc = establish(*configs())
    ini.rekey_child(ic.spi_in, 5.0)
    (req,) = ini.datagrams_to_send()
    inner = open_request(ini, req)
    ke = inner.first(KE)
    sa_p = inner.first(SA)
    assert isinstance(ke, KE) and isinstance(sa_p, SA)
    nk = ini.negotiated_keys()
    assert nk is not None and ke.group == nk.dh_group
    for p in sa_p.proposals:
        groups = [t.transform_id for t in p.of_type(TransformType.DH)]
        assert groups[0] == ke.group
        assert set(groups) == {DhId.CURVE25519, DhId.ECP_256, DhId.MODP_2048}


def test_rekey_without_pfs_when_the_peer_refuses_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A responder that accepts no DH in Child SA proposals: NO_PROPOSAL_CHOSEN, then
    one more request without KE, which it accepts."""

    def no_dh(offered: list[Any], ours: Any, ke_group: int | None, *rest: Any) -> Any:
        return select_child_proposal(
            [p for p in offered if not p.of_type(TransformType.DH)], ours, ke_group, *rest
        )

    ini, res, ic, rc = establish(*configs())
    monkeypatch.setattr(child_sa, "select_child_proposal", no_dh)
    ini.rekey_child(ic.spi_in, 5.0)
    (first,) = ini.datagrams_to_send()
    assert isinstance(open_request(ini, first).first(KE), KE)
    res.receive_datagram(first, 5.0, I_ADDR)
    shuttle(ini, res, 5.0)
    ie, re = events(ini), events(res)
    assert [type(e) for e in ie] == [ChildSaRekeyed, ChildSaDeleted], ie
    assert [type(e) for e in re] == [ChildSaRekeyed, ChildSaDeleted], re
    new_i, new_r = ie[0], re[0]
    assert isinstance(new_i, ChildSaRekeyed) and isinstance(new_r, ChildSaRekeyed)
    assert_mirror(new_i, new_r)
    assert (new_i.old_spi_in, new_r.old_spi_in) == (ic.spi_in, rc.spi_in)
