"""python-oe: opportunistic IPsec for every device behind an OpenWrt router."""

from oe_router.lazypkg import defer

__version__ = "0.1.0"

# What the daemon imports and never runs costs a small router RAM (docs/footprint.md):
# pyroute2's __init__ imports all of pyroute2 (~10 MB); ours import only its submodules.
defer("pyroute2")
# dnspython's feature probe imports importlib.metadata (zipfile, email, csv ...: ~3.5 MB)
# to read versions it asks for only when a feature is not forced (below).
defer("importlib.metadata")
# dnspython imports idna (its tables: ~0.2 MB) for IDNA 2008, which only a non-ASCII name
# given as text needs: names off the wire and ASCII config never do.
defer("idna")


def _dnspython_features() -> None:
    """Answer dnspython's feature probes for the features this package's imports ask at
    import time, where the answer is known without reading package metadata: DNSSEC
    needs cryptography (a dependency of ours); IDNA 2008 needs the idna package, 3.7 or
    later (dnspython's own requirement), whose version its package_data module holds."""
    import importlib.util

    import dns._features

    if importlib.util.find_spec("cryptography") is not None:
        dns._features.force("dnssec", True)
    if importlib.util.find_spec("idna") is None:
        dns._features.force("idna", False)
        return
    try:
        from idna.package_data import __version__ as idna_version
    except ImportError:  # an idna of another layout: leave it to dnspython's own probe
        return
    parts = [int(p) for p in idna_version.split(".")[:2] if p.isdigit()]
    dns._features.force("idna", tuple(parts) >= (3, 7))


_dnspython_features()
