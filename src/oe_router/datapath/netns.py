"""The old home of ``in_netns``: it moved to ``oe_router.netns``, below both the IKE
endpoint and the datapaths, which both open sockets in a namespace. Kept because some
twenty test modules and tools import it from here."""

from oe_router.netns import in_netns

__all__ = ["in_netns"]
