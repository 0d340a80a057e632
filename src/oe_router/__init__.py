"""python-oe: opportunistic IPsec for every device behind an OpenWrt router."""

__version__ = "0.1.0"
