"""labkit: the CONTENT of the QEMU lab's Internet, generated on the host per run.

DNSSEC-signed zones with their own trust anchor (``zones``), a knot runner
(``knot``), an unbound runner/config (``unbound``), IPsec peer configs and keys
(``peers``) and the whole world bundle (``world``).  Keys are fresh on every
build so nothing secret is baked into an image.
"""
