"""Crypto engines (AF_ALG, cryptodev, software): discovery, known-answer tests, measurement.

``engine.py`` is the one interface; each engine is a module of its own and is imported
only when it is used (a daemon on the kernel datapath never loads ``cryptography`` here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .engine import (
    TRANSFORMS,
    AuthenticationFailed,
    Engine,
    EngineError,
    EngineKind,
    EspCipher,
    OpenRequest,
    SealRequest,
    Transform,
    transform,
)

__all__ = [
    "TRANSFORMS",
    "AuthenticationFailed",
    "Engine",
    "EngineError",
    "EngineKind",
    "EspCipher",
    "OpenRequest",
    "SealRequest",
    "Transform",
    "make_engine",
    "transform",
]

ENGINE_NAMES = "software, afalg, afalg:<driver>, cryptodev, cryptodev:<driver>"


def make_engine(name: str, environ: Mapping[str, str] | None = None) -> Engine:
    """The engine ``name`` stands for (see ``Engine``), as the daemon and the datapath's
    worker processes build it; EngineError for a name that is none of ENGINE_NAMES.

    Each engine module is imported here, when asked for. ``OE_ROUTER_FAULT`` in
    ``environ`` (default: the process environment) wraps the engine in the test-only
    ``faults.FaultyEngine``.
    """
    kind, colon, driver = name.partition(":")
    engine: Engine
    if name == "software":
        from .software import SoftwareEngine

        engine = SoftwareEngine()
    elif kind == "afalg" and (driver or not colon):
        from .afalg import AfAlgEngine

        engine = AfAlgEngine(driver=driver or None)
    elif kind == "cryptodev" and (driver or not colon):
        from .cryptodev import CryptodevEngine

        engine = CryptodevEngine(driver=driver or None)
    else:
        raise EngineError(f"unknown engine {name!r}: use one of {ENGINE_NAMES}")
    env = os.environ if environ is None else environ
    if env.get("OE_ROUTER_FAULT"):
        from .faults import apply_faults

        engine = apply_faults(engine, env)
    return engine
