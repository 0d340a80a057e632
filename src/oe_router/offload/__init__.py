"""Crypto engines (AF_ALG, cryptodev, software): discovery, known-answer tests, measurement.

``engine.py`` is the one interface; each engine is a module of its own and is imported
only when it is used (a daemon on the kernel datapath never loads ``cryptography`` here).
"""

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
    "transform",
]
