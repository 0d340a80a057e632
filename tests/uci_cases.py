"""UCI files that libuci reads in its own way, and how it reads them.

Each was found by tests/host/test_uci_libuci.py, where the real libuci (openwrt/uci
66127cd, built by qemu/userland.py) and the project's parser disagreed before the parser
followed libuci. The unit tests hold the parser to these readings
(tests/unit/test_uci.py); the host test checks that libuci still reads them so.
"""

from __future__ import annotations

from dataclasses import dataclass

Sections = list[tuple[str, str | None, dict[str, str], dict[str, list[str]]]]


@dataclass(frozen=True)
class LibuciRead:
    """A file and libuci's reading: sections (type, name, options, lists) in order, or a
    refusal (libuci's words for it and the parser's own reason)."""

    text: str
    sections: Sections | None = None
    our_error: str | None = None
    libuci_error: str | None = None


def refused(text: str, ours: str, libuci: str) -> LibuciRead:
    return LibuciRead(text, None, ours, libuci)


LIBUCI_READS = [
    # An unquoted word touching ';' has its terminating NUL written over the ';' (libuci
    # parses the line in place), so the rest of the line is lost. After quoted text, the
    # ';' survives and separates.
    LibuciRead("config t x\noption b c;option d e\n", [("t", "x", {"b": "c"}, {})]),
    LibuciRead("config t x\noption b 'c';option d e\n", [("t", "x", {"b": "c", "d": "e"}, {})]),
    LibuciRead("c oe; o enabled 0\n", [("oe", None, {}, {})]),
    # A ';' where an optional argument would start fills it with nothing, so the next
    # statement's command word is one argument too many.
    refused("config t ; option b c\n", "config: too many arguments", "too many arguments"),
    refused("config 't';option b c\n", "config: too many arguments", "too many arguments"),
    refused("config t\noption b ;option d e\n", "option: too many arguments", "too many arguments"),
    # The command word is split off at a space or tab only (strtok) and taken as written:
    # no quotes, escapes, other blanks or empty statements.
    refused("'config' t\n", "invalid command \"'config'\"", "invalid command"),
    refused("config\vt\n", "invalid command 'config\\x0bt'", "invalid command"),
    refused("config t\n;\n", "invalid command ';'", "invalid command"),
    refused("config t\n\\\noption a b\n", "invalid command '\\\\'", "invalid command"),
    refused(
        "config t 'x';\n",
        "a ';' must be followed by a statement on the same line",
        "invalid command",
    ),
    refused("config t\noption b 'c';;option d e\n", "invalid command ';option'", "invalid command"),
    # A value set again keeps its place, also when a list becomes an option again.
    LibuciRead(
        "config t\noption x 1\noption y 2\noption x 33\n",
        [("t", None, {"x": "33", "y": "2"}, {})],
    ),
    LibuciRead(
        "config t\noption a 1\nlist x p\noption b 2\noption x q\n",
        [("t", None, {"a": "1", "x": "q", "b": "2"}, {})],
    ),
    # In a file, `option x ''` does nothing: it does not delete x (`uci set` would).
    LibuciRead(
        "config t\noption x 1\noption x ''\noption y 2\n",
        [("t", None, {"x": "1", "y": "2"}, {})],
    ),
    # A name seen again continues that section; strict libuci (uci's default) refuses it
    # with another type.
    LibuciRead(
        "config t n\noption x 1\nconfig t n\nlist x 2\noption x 3\nconfig t\n",
        [("t", "n", {"x": "3"}, {}), ("t", None, {}, {})],
    ),
    refused(
        "config t n\nconfig u n\n",
        "section 'n' was opened as 't' at line 1; libuci refuses another type for the same name",
        "section of different type overwrites prior section with same name",
    ),
    # ... and so does the name libuci makes up for an unnamed section (cfg, its number,
    # a djb hash of its type).
    LibuciRead(
        "config t\noption a 1\nconfig t cfg01b619\noption b 2\nconfig u cfg02b61a\n",
        [("t", None, {"a": "1", "b": "2"}, {}), ("u", "cfg02b61a", {}, {})],
    ),
    # `uci export oe` loads one file: a package statement anywhere names nothing.
    LibuciRead("config t\npackage other\n", [("t", None, {}, {})]),
]
