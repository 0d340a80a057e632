"""oe-routerd's entry point: it takes SIGHUP before the daemon's imports.

Why a module of its own: importing ``oe_router.daemon`` (cryptography, pyroute2,
dnspython ...) takes 0.6 s on a PC and about 11 s on a slow router. A reload that procd
sends meanwhile (an interface trigger right after START, ``reload_config``) is a SIGHUP,
whose default action ends the process without a word; procd then restarts it 5 s later.
Here a HUP in that window is remembered, and the daemon reloads once it runs, so the
change the HUP announced is not lost either.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    hups: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        hups.append(signum)

    signal.signal(signal.SIGHUP, remember)
    from oe_router.daemon import main as daemon_main  # the slow imports

    return daemon_main(argv, hups=hups)


if __name__ == "__main__":
    raise SystemExit(main())
