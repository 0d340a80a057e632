"""UCI configuration: parse and write /etc/config/oe, typed schema, validation.

Public API (other modules code against exactly these names)::

    load_config(path) -> OeConfig            # raises ConfigInvalid
    parse_config(text, filename) -> OeConfig # raises ConfigInvalid
    check_config(path) -> list[ConfigProblem]  # never raises for bad or missing files
"""

from __future__ import annotations

import os

from .problems import ConfigInvalid, ConfigProblem
from .schema import (
    DnsConfig,
    Endpoint,
    IdentityConfig,
    IkeConfig,
    OeConfig,
    PolicyConfig,
    PolicyEntry,
)
from .validate import validate_text

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigInvalid",
    "ConfigProblem",
    "DnsConfig",
    "Endpoint",
    "IdentityConfig",
    "IkeConfig",
    "OeConfig",
    "PolicyConfig",
    "PolicyEntry",
    "check_config",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/config/oe"


def _read(path: str | os.PathLike[str]) -> tuple[str | None, list[ConfigProblem]]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return None, [ConfigProblem(name, None, None, None, f"cannot read the file: {reason}")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        msg = f"is not UTF-8 text (byte 0x{data[exc.start]:02x})"
        return None, [ConfigProblem(name, line, None, None, msg, col)]


def _check(path: str | os.PathLike[str]) -> tuple[OeConfig | None, list[ConfigProblem]]:
    text, problems = _read(path)
    if text is None:
        return None, problems
    return validate_text(text, os.fspath(path))


def check_config(path: str | os.PathLike[str]) -> list[ConfigProblem]:
    """Every problem of the file at ``path``; empty means it would load."""
    return _check(path)[1]


def load_config(path: str | os.PathLike[str]) -> OeConfig:
    """The typed config of the file at ``path``; raises ConfigInvalid listing all problems."""
    config, problems = _check(path)
    if problems or config is None:
        raise ConfigInvalid(problems)
    return config


def parse_config(text: str, filename: str = "<string>") -> OeConfig:
    """The typed config of UCI ``text``; raises ConfigInvalid listing all problems."""
    config, problems = validate_text(text, filename)
    if problems or config is None:
        raise ConfigInvalid(problems)
    return config
