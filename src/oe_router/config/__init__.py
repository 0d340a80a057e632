"""UCI configuration: parse and write /etc/config/oe, typed schema, validation.

Public API (other modules code against exactly these names)::

    load_config(path) -> OeConfig            # raises ConfigInvalid
    parse_config(text, filename) -> OeConfig # raises ConfigInvalid
    check_config(path) -> list[ConfigProblem]  # never raises for bad or missing files
    control_socket_of(path) -> str | None      # even from a file with errors (the CLI)
    validate_file(path) -> (OeConfig | None, list[ConfigProblem])  # both in one pass
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from oe_router.lazypkg import exports

from .problems import ConfigInvalid, ConfigProblem
from .uci import UciSyntaxError, parse

# The typed schema and the validator load on first use: the ``oe`` CLI reads the file
# only for its control socket (``control_socket_of``), which a config rarely sets.
if TYPE_CHECKING:
    from .schema import (
        DnsConfig,
        Endpoint,
        IdentityConfig,
        IkeConfig,
        OeConfig,
        PolicyConfig,
        PolicyEntry,
    )

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
    "control_socket_of",
    "load_config",
    "parse_config",
    "validate_file",
]

DEFAULT_CONFIG_PATH = "/etc/config/oe"

__getattr__ = exports(
    __name__,
    dict.fromkeys(
        (
            "DnsConfig",
            "Endpoint",
            "IdentityConfig",
            "IkeConfig",
            "OeConfig",
            "PolicyConfig",
            "PolicyEntry",
        ),
        "schema",
    ),
)


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


def validate_file(path: str | os.PathLike[str]) -> tuple[OeConfig | None, list[ConfigProblem]]:
    """The typed config of the file at ``path`` (None unless it is free of problems) and
    every problem; never raises for bad or missing files."""
    from .validate import validate_text

    text, problems = _read(path)
    if text is None:
        return None, problems
    return validate_text(text, os.fspath(path))


def check_config(path: str | os.PathLike[str]) -> list[ConfigProblem]:
    """Every problem of the file at ``path``; empty means it would load."""
    return validate_file(path)[1]


def load_config(path: str | os.PathLike[str]) -> OeConfig:
    """The typed config of the file at ``path``; raises ConfigInvalid listing all problems."""
    config, problems = validate_file(path)
    if problems or config is None:
        raise ConfigInvalid(problems)
    return config


def parse_config(text: str, filename: str = "<string>") -> OeConfig:
    """The typed config of UCI ``text``; raises ConfigInvalid listing all problems."""
    from .validate import validate_text

    config, problems = validate_text(text, filename)
    if problems or config is None:
        raise ConfigInvalid(problems)
    return config


def control_socket_of(path: str | os.PathLike[str]) -> str | None:
    """``control_socket`` of the file's ``config oe`` section, read leniently: None when
    the file cannot be read or does not set a usable one.

    Why: ``oe reload`` is most needed when the file has errors, and a daemon started with
    a custom socket is only found through the file. So nothing but UCI syntax is
    required (a bad value anywhere else does not matter), and at a syntax error the
    statements before its line are used. The option itself must be a valid path.
    """
    text, _ = _read(path)
    if text is None:
        return None
    try:
        pkg = parse(text, os.fspath(path))
    except UciSyntaxError as exc:
        before = "".join(text.splitlines(keepends=True)[: exc.line - 1])
        try:
            pkg = parse(before, os.fspath(path))
        except UciSyntaxError:
            return None
    section = next((s for s in pkg.sections if s.type == "oe"), None)
    value = section.options.get("control_socket") if section is not None else None
    if value is None:
        return None
    from .schema import BadValue
    from .validate import OPTIONS

    try:
        socket: str = OPTIONS["oe"]["control_socket"].parse(value)
    except BadValue:
        return None
    return socket
