"""The project's UCI parser held against the real libuci (issue 12: "UCI, twice checked").

The daemon keeps its own parser (it checks a file on any host, before replacing the running
config), but on a router libuci reads the same file for every other tool. So each file here
goes through both ``uci -c DIR export oe`` (libuci built from source by qemu/userland.py)
and ``oe_router.config.uci.parse``: they must load the same sections, options and lists in
the same order, or both refuse the file. The files are the shipped /etc/config/oe, every
good and bad fixture, the fuzz seeds, and generated text (quoting, escapes, lists,
comments, ';', line joins, odd whitespace).

libuci's export is read back by ``read_export`` below, a reader of export's fixed layout
only, not by the parser under test.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oe_router.config.uci import UciPackage, UciSyntaxError, parse
from tests.uci_cases import LIBUCI_READS, LibuciRead

REPO = Path(__file__).resolve().parents[2]
FIXTURES = sorted((REPO / "tests" / "unit" / "configs").rglob("*.conf"))
SEEDS = sorted((REPO / "fuzz" / "corpus" / "uci").glob("*"))

# (type, name or None, ((option, value), ...), ((list, (item, ...)), ...)) per section
Model = tuple[tuple[str, str | None, tuple[Any, ...], tuple[Any, ...]], ...]


class Libuci:
    """``uci export`` of one file at a time, in a private config and save dir."""

    def __init__(self, userland: Any, workdir: Path) -> None:
        self.uci = str(userland.tool("uci"))
        self.env = userland.env()
        self.conf = workdir / "config"
        self.save = workdir / "save"  # -P: no deltas from /tmp/.uci can leak in
        self.conf.mkdir()
        self.save.mkdir()

    def load(self, data: bytes) -> Model | str:
        """libuci's model of the file, or its error message."""
        (self.conf / "oe").write_bytes(data)
        res = subprocess.run(
            [self.uci, "-c", str(self.conf), "-P", str(self.save), "export", "oe"],
            capture_output=True,
            env=self.env,
            timeout=30,
            check=False,
        )
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            assert err, f"uci export failed (rc {res.returncode}) without a message"
            return err
        return read_export(res.stdout.decode("utf-8", errors="surrogateescape"))


def _quoted(text: str, i: int) -> tuple[str, int]:
    """A value as uci_escape writes it: '...' with each ' inside as '\\''."""
    assert text[i] == "'", text[i:]
    out, i = [], i + 1
    while True:
        j = text.index("'", i)
        out.append(text[i:j])
        if text.startswith("'\\''", j):
            out.append("'")
            i = j + 4
        else:
            return "".join(out), j + 1


def read_export(text: str) -> Model:
    """Sections of ``uci export``'s layout: ``package P``, then per section ``\\nconfig
    TYPE['NAME']`` and ``\\toption|list NAME 'VALUE'`` lines."""
    assert text.startswith("package oe\n"), text[:40]
    i = len("package oe\n")
    sections: list[tuple[str, str | None, list[Any], list[Any]]] = []
    while i < len(text):
        if text.startswith("\nconfig ", i):
            i += len("\nconfig ")
            j = i
            while text[j] not in " \n":
                j += 1
            stype = text[i:j].replace("'\\''", "'")
            name = None
            if text[j] == " ":
                name, j = _quoted(text, j + 1)
            assert text[j] == "\n"
            sections.append((stype, name, [], []))
            i = j + 1
        elif text.startswith("\t", i) and sections:
            kind, rest = text[i + 1 :].split(" ", 1)
            opt = rest.split(" ", 1)[0]
            value, j = _quoted(text, i + 1 + len(kind) + 1 + len(opt) + 1)
            assert text[j] == "\n"
            _, _, options, lists = sections[-1]
            if kind == "option":
                options.append((opt, value))
            elif lists and lists[-1][0] == opt:
                lists[-1][1].append(value)
            else:
                assert kind == "list", kind
                lists.append((opt, [value]))
            i = j + 1
        elif text[i:] == "\n":
            break
        else:
            raise AssertionError(f"unexpected export text at {i}: {text[i : i + 40]!r}")
    return tuple((t, n, tuple(o), tuple((k, tuple(v)) for k, v in ls)) for t, n, o, ls in sections)


def ours(data: bytes) -> Model | UciSyntaxError:
    try:
        pkg: UciPackage = parse(data.decode("utf-8", errors="surrogateescape"), "oe")
    except UciSyntaxError as exc:
        return exc
    return tuple(
        (
            s.type,
            s.name,
            tuple(s.options.items()),
            tuple((k, tuple(v)) for k, v in s.lists.items()),
        )
        for s in pkg.sections
    )


def agree(libuci: Libuci, data: bytes) -> None:
    """Same model, or both refuse."""
    theirs = libuci.load(data)
    mine = ours(data)
    if isinstance(theirs, str) or isinstance(mine, UciSyntaxError):
        assert isinstance(theirs, str) and isinstance(mine, UciSyntaxError), (
            f"only one refuses {data!r}: libuci {theirs!r}, ours {mine!r}"
        )
        return
    assert mine == theirs, f"models differ for {data!r}"


@pytest.fixture(scope="module")
def libuci(openwrt_userland: Any) -> Iterator[Libuci]:
    with tempfile.TemporaryDirectory(prefix="oe-uci-") as tmp:
        yield Libuci(openwrt_userland, Path(tmp))


def test_shipped_config_reads_the_same(libuci: Libuci) -> None:
    data = (REPO / "files" / "etc" / "config" / "oe").read_bytes()
    theirs = libuci.load(data)
    assert not isinstance(theirs, str), theirs
    # The shipped file has every section type and lists: a real comparison, not two empties.
    assert {s[0] for s in theirs} >= {"oe", "dns", "ike", "identity"}
    assert any(s[3] for s in theirs)
    assert ours(data) == theirs


def test_every_fixture_and_fuzz_seed(libuci: Libuci) -> None:
    assert len(FIXTURES) >= 40 and len(SEEDS) >= 40
    refused = 0
    for path in FIXTURES + SEEDS:
        data = path.read_bytes()
        if b"\0" in data:
            continue  # see test_nul_byte_is_refused_where_libuci_truncates
        agree(libuci, data)
        refused += isinstance(ours(data), UciSyntaxError)
    # The bad fixtures with grammar errors are refused by both (the rest are schema errors).
    assert refused >= 4


@pytest.mark.parametrize("case", LIBUCI_READS, ids=lambda c: repr(c.text)[:40])
def test_disagreements_found_now_agree(libuci: Libuci, case: LibuciRead) -> None:
    """The files where the two once disagreed (tests/uci_cases.py): libuci still reads
    them as recorded, and the parser as libuci does."""
    data = case.text.encode()
    theirs = libuci.load(data)
    mine = ours(data)
    if case.sections is None:
        assert isinstance(theirs, str) and f"({case.libuci_error})" in theirs, theirs
        assert isinstance(mine, UciSyntaxError) and mine.reason == case.our_error
        return
    expected = tuple(
        (t, n, tuple(o.items()), tuple((k, tuple(v)) for k, v in ls.items()))
        for t, n, o, ls in case.sections
    )
    assert theirs == expected
    assert mine == expected


def test_nul_byte_is_refused_where_libuci_truncates(libuci: Libuci) -> None:
    """The one deliberate difference: libuci reads lines with fgets() and strlen(), so a
    NUL silently drops the rest of its line (how much depends on its buffer size). Ours
    refuses the file, naming the byte, rather than guess what the router's tools saw."""
    data = b"config t\noption a 'kept'\noption b x\0lost\n"
    theirs = libuci.load(data)
    assert theirs == (("t", None, (("a", "kept"), ("b", "x")), ()),)
    mine = ours(data)
    assert isinstance(mine, UciSyntaxError) and mine.reason == "NUL byte in file"


# ---------------------------------------------------------------------- generated files

NAME = st.from_regex(r"[A-Za-z0-9_]{1,6}", fullmatch=True)
ODD_NAME = st.sampled_from(["a-b", "x.y", "", "é", "1 2"])
TYPE = st.from_regex(r"[!-~]{1,6}", fullmatch=True)
ODD = [*"'\"\\#;\t\n\r\v\f$` ", "ü", "\x01", "\x1f"]
TEXT = st.text(st.sampled_from([*"ab1_./:" * 3, *ODD]), max_size=10)


def often(*common: str, rare: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """One of ``common``, and one time in 16 one of ``rare`` (shrinking goes to common)."""
    if not rare:
        return st.sampled_from(common)
    return st.integers(0, 15).flatmap(lambda n: st.sampled_from(rare if n == 15 else common))


AFTER_COMMAND = often(" ", "\t", " \t", rare=("\v", "\r", " \\\n"))
BETWEEN = often(" ", "\t", "  ", rare=("\v", "\f", "\r", " \\\n ", " \\\r\n"))
END = often("\n", "\r\n", " \n", "\t# note\n", rare=(" ;\n", ";", "; ", "\n\n", "#;x\n", ""))


@st.composite
def word(draw: st.DrawFn, text: st.SearchStrategy[str]) -> str:
    """One argument written in any of UCI's ways, pieces side by side now and then."""
    value = draw(text)
    styles = draw(st.lists(often("plain", "single", rare=("double",)), min_size=1, max_size=3))
    pieces = []
    for style in styles:
        if style == "single" and "'" not in value:
            pieces.append(f"'{value}'")
        elif style == "double":
            pieces.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            escaped = "".join("\\" + c if c in " \t\n\r\v\f'\"\\#;" else c for c in value)
            pieces.append(escaped or "''")
    return "".join(pieces)


def name(draw: st.DrawFn, *extra: str) -> str:
    """A section or option name, now and then one libuci refuses."""
    names = st.integers(0, 15).flatmap(
        lambda n: ODD_NAME if n == 15 else st.one_of(NAME, *(st.just(e) for e in extra))
    )
    return draw(word(names))


@st.composite
def uci_files(draw: st.DrawFn) -> bytes:
    """Mostly well-formed files in every spelling UCI allows, with now and then something
    libuci refuses or reads its own way."""
    out = []
    if draw(st.integers(0, 3)) == 0:
        out.append("package" + draw(AFTER_COMMAND) + name(draw) + draw(END))
    for _ in range(draw(st.integers(1, 4))):
        head = draw(often("config", rare=("c",))) + draw(AFTER_COMMAND) + draw(word(TYPE))
        if draw(st.booleans()):
            head += draw(BETWEEN) + name(draw, "n", "m")  # n, m: sections named again
        out.append(draw(often("", rare=(" ", "\t", "\v"))) + head + draw(END))
        for _ in range(draw(st.integers(0, 5))):
            cmd = draw(often("option", "list", rare=("o", "l")))
            line = draw(often("\t", "  ", rare=("", "\v"))) + cmd
            line += draw(AFTER_COMMAND) + name(draw, "x", "y")  # x, y: set again, listed
            if draw(st.integers(0, 5)):
                line += draw(BETWEEN) + draw(word(TEXT))
            out.append(line + draw(END))
        if draw(st.integers(0, 3)) == 0:
            out.append(draw(st.sampled_from(["# c\n", "\n", "  \t\n", ";\n", "#x;y\n"])))
    return "".join(out).encode()


TOKENS = [
    *["config ", "option ", "list ", "c ", "o ", "l ", "package "] * 2,
    *["x", "t", "1", "_", " ", " ", "\t", "\n", "\n", "'", '"', "\\", "#", ";"],
    *["\r", "\v", "\\\n", "\r\n", "config", "ü"],
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uci_files())
def test_generated_files_agree(libuci: Libuci, data: bytes) -> None:
    agree(libuci, data)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30))
def test_token_soup_agrees(libuci: Libuci, tokens: list[str]) -> None:
    """Command words, quotes, escapes, comments and separators in any order: mostly
    refused, which is where the two readers' error paths must agree."""
    agree(libuci, "".join(tokens).encode())
