"""The UCI grammar as libuci reads it (openwrt/uci file.c), the writer, and round trips."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.config.uci import UciPackage, UciSection, UciSyntaxError, dumps, parse, quote
from oe_router.config.validate import validate_text
from tests.uci_cases import LIBUCI_READS, LibuciRead


def one(text: str) -> UciSection:
    pkg = parse(text)
    assert len(pkg.sections) == 1
    return pkg.sections[0]


def test_basic_file() -> None:
    pkg = parse(
        "package oe\n\nconfig dns 'dns'\n\toption hold_limit '3s'\n"
        "\tlist listen '127.0.0.1:5335'\n\tlist listen \"[::1]:5335\"\n\nconfig policy\n"
        "\toption group clear\n"
    )
    assert pkg.name == "oe"
    assert pkg.sections == [
        UciSection(
            "dns", "dns", {"hold_limit": "3s"}, {"listen": ["127.0.0.1:5335", "[::1]:5335"]}
        ),
        UciSection("policy", None, {"group": "clear"}),
    ]
    assert [s.line for s in pkg.sections] == [3, 8]
    assert pkg.sections[0].option_lines == {"hold_limit": 4}
    assert pkg.sections[0].list_lines == {"listen": [5, 6]}


@pytest.mark.parametrize(
    ("value_text", "value"),
    [
        ("'single'", "single"),
        ('"double"', "double"),
        ("plain", "plain"),
        ("'a'\"b\"c", "abc"),  # adjacent pieces concatenate
        ("'it'\\''s'", "it's"),  # libuci's own escape of '
        ("'back\\slash'", "back\\slash"),  # no escapes inside single quotes
        ('"a\\"b"', 'a"b'),  # backslash escapes inside double quotes
        ('"a\\\\b"', "a\\b"),
        ('"tab\\tx"', "tabtx"),  # libuci does not decode: \t is the letter t
        ("a\\ b", "a b"),  # unquoted backslash escapes a space
        ("'x # y'", "x # y"),  # '#' inside quotes is text
        ("'x ; y'", "x ; y"),  # ';' inside quotes is text
        ("'multi\nline'", "multi\nline"),  # quoted values span lines
        ('"multi\nline"', "multi\nline"),
        ('"join\\\nme"', "joinme"),  # backslash-newline joins lines
        ("un\\\nquoted", "unquoted"),
        ("'crlf\r\nkept'", "crlf\r\nkept"),
        ("'ünïcødé ✓'", "ünïcødé ✓"),
    ],
)
def test_values(value_text: str, value: str) -> None:
    assert one(f"config t\n\toption v {value_text}\n").options == {"v": value}


def test_comments_and_separators() -> None:
    sec = one(
        "# leading comment\nconfig t 'n' # trailing comment\n"
        "\toption a x#comment straight after a word\n"
        "\toption b 'y'; option c \"z\";list d '1' ; list d 2\n"
        "   \n\t# indented comment\n"
    )
    assert sec.name == "n"
    assert sec.options == {"a": "x", "b": "y", "c": "z"}
    assert sec.lists == {"d": ["1", "2"]}


def test_short_command_words_and_anonymous_sections() -> None:
    pkg = parse("p oe\nc t\no a 1\nl b 2\nc t ''\nconfig t\n")
    assert pkg.name == "oe"
    assert [(s.type, s.name) for s in pkg.sections] == [("t", None)] * 3
    assert pkg.sections[0].options == {"a": "1"} and pkg.sections[0].lists == {"b": ["2"]}


def test_option_semantics_follow_libuci() -> None:
    # uci_set: a value set again keeps its place; in a file an empty value does nothing
    # (libuci has not looked the option up completely there, so it does not delete).
    sec = one("config t\n option a 1\n option b 2\n option a 3\n option b ''\n option c\n")
    assert list(sec.options.items()) == [("a", "3"), ("b", "2")]
    # uci_add_list turns an option into a list in its place; a later option replaces it.
    sec = one("config t\n option x 1\n list x 2\n list y 1\n option y 9\n list z ''\n")
    assert sec.lists == {"x": ["1", "2"], "z": [""]}
    assert sec.options == {"y": "9"}
    assert sec.list_lines["x"] == [2, 3]
    # Programmatic set_option (what `uci set` does) still deletes with an empty value.
    sec.set_option("y", "")
    assert sec.options == {}


@pytest.mark.parametrize("case", LIBUCI_READS, ids=lambda c: repr(c.text)[:48])
def test_reads_files_as_libuci_does(case: LibuciRead) -> None:
    """Regressions: where libuci (tests/host/test_uci_libuci.py) read these otherwise."""
    if case.sections is None:
        with pytest.raises(UciSyntaxError) as info:
            parse(case.text)
        assert info.value.reason == case.our_error
        return
    pkg = parse(case.text)
    assert [(s.type, s.name, s.options, s.lists) for s in pkg.sections] == case.sections
    for sec, (_, _, options, lists) in zip(pkg.sections, case.sections, strict=True):
        assert list(sec.options) == list(options) and list(sec.lists) == list(lists)


def test_sections_named_again_are_merged_and_remembered() -> None:
    pkg = parse("config t n\n option a 1\nconfig t m\nconfig t n\n option b 2\n")
    assert [s.name for s in pkg.sections] == ["n", "m"]
    assert pkg.sections[0].options == {"a": "1", "b": "2"}
    assert (pkg.sections[0].line, pkg.sections[0].reopened) == (1, [4])
    assert pkg.sections[0].option_lines == {"a": 2, "b": 5}


def test_the_first_package_statement_names_the_file() -> None:
    pkg = parse("package oe\nconfig t\npackage other\n")
    assert (pkg.name, pkg.package_line) == ("oe", 1)


@pytest.mark.parametrize(
    ("text", "line", "column", "reason"),
    [
        ("config t\n\toption a 'open\n", 2, 11, "unterminated ' quote"),
        ('config t\n\toption a "open\n\nmore', 2, 11, 'unterminated " quote'),
        ("option a b\n", 1, 1, "option found before the first config section"),
        ("list a b\n", 1, 1, "list found before the first config section"),
        ("config\n", 1, 1, "config: missing section type"),
        ("config ''\n", 1, 8, "config: missing section type"),
        ("config t n extra\n", 1, 12, "config: too many arguments"),
        ("config t\n option\n", 2, 2, "option: missing option name"),
        ("config t\n option a b c\n", 2, 13, "option: too many arguments"),
        (
            "config t\n option a-b c\n",
            2,
            9,
            "invalid character in option name 'a-b' (use letters, digits and _)",
        ),
        (
            "config t 'a b'\n",
            1,
            10,
            "invalid character in section name 'a b' (use letters, digits and _)",
        ),
        ("config 't t'\n", 1, 8, "invalid character in section type 't t'"),
        ("options a b\n", 1, 1, "invalid command 'options'"),
        ("config t\n\n   frob\n", 3, 4, "invalid command 'frob'"),
        ("package\n", 1, 1, "package: missing package name"),
        ("package a.b\n", 1, 9, "invalid character in package name 'a.b'"),
        ("config t\n option a 'x\0y'\n", 2, 13, "NUL byte in file"),
    ],
)
def test_syntax_errors(text: str, line: int, column: int, reason: str) -> None:
    with pytest.raises(UciSyntaxError) as info:
        parse(text, "/etc/config/oe")
    err = info.value
    assert (err.line, err.column, err.reason) == (line, column, reason)
    assert str(err) == f"/etc/config/oe:{line}:{column}: {reason}"
    assert "\n" not in str(err)


def test_error_after_multiline_value_points_at_the_right_line() -> None:
    with pytest.raises(UciSyntaxError) as info:
        parse("config t\n option a 'one\ntwo\nthree'\n option b 'x\n")
    assert (info.value.line, info.value.column) == (5, 11)


def test_writer_layout_matches_uci_export() -> None:
    pkg = UciPackage(
        "oe",
        [
            UciSection("dns", "dns", {"hold_limit": "3s"}, {"listen": ["a", "it's"]}),
            UciSection("policy"),
        ],
    )
    assert dumps(pkg) == (
        "package oe\n\nconfig dns 'dns'\n\toption hold_limit '3s'\n"
        "\tlist listen 'a'\n\tlist listen 'it'\\''s'\n\nconfig policy\n"
    )
    assert quote("") == "''"


@pytest.mark.parametrize(
    "pkg",
    [
        UciPackage("a.b"),
        UciPackage(None, [UciSection("t t")]),
        UciPackage(None, [UciSection("t", "a-b")]),
        UciPackage(None, [UciSection("t", None, {"a-b": "1"})]),
        UciPackage(None, [UciSection("t", None, {"a": ""})]),
        UciPackage(None, [UciSection("t", None, {}, {"a": ["x\0"]})]),
    ],
)
def test_writer_refuses_what_libuci_cannot_read(pkg: UciPackage) -> None:
    with pytest.raises(ValueError):
        dumps(pkg)


# ----------------------------------------------------------------- round-trip property

NAME = st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True)
TYPE = st.from_regex(r"[!-~]{1,12}", fullmatch=True)
NASTY = st.sampled_from([*"'\"\\#; \t\n\r$`{}[]%@=", "'\\''", "\\\n", "ü", "✓"])
VALUE = st.lists(st.one_of(NASTY, st.characters(exclude_characters="\0")), max_size=20).map("".join)


@st.composite
def sections(draw: st.DrawFn) -> UciSection:
    option_names = draw(st.lists(NAME, unique=True, max_size=5))
    split = draw(st.integers(0, len(option_names)))
    options = {n: draw(VALUE.filter(bool)) for n in option_names[:split]}
    lists = {n: draw(st.lists(VALUE, min_size=1, max_size=4)) for n in option_names[split:]}
    return UciSection(draw(TYPE), draw(st.none() | NAME), options, lists)


PACKAGES = st.builds(
    UciPackage,
    st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    # unique names: libuci (and so the parser) merges sections that share one
    st.lists(sections(), max_size=5, unique_by=lambda s: s.name or object()),
)


@settings(max_examples=300, deadline=None)
@given(PACKAGES)
def test_round_trip_model_write_parse(pkg: UciPackage) -> None:
    text = dumps(pkg)
    again = parse(text)
    assert again == pkg
    assert dumps(again) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("co ptinlsa'\"\\#;\n\tx_1")), max_size=60))
def test_parser_never_fails_unexpectedly(text: str) -> None:
    """Arbitrary text either parses (and then round-trips) or raises UciSyntaxError."""
    try:
        pkg = parse(text)
    except UciSyntaxError as err:
        assert err.line >= 1 and err.column >= 1
        return
    try:
        written = dumps(pkg)
    except ValueError:
        return  # e.g. an empty option value in the model cannot be written
    assert parse(written) == pkg


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail a parse that loops (instead of hanging the run and growing memory)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"parse still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fuzz_regression_non_c_whitespace_inside_a_statement() -> None:
    """Found by fuzz/targets/uci.py (seed regress-uci-unit-separator): \\x1f is whitespace to
    str.isspace() but not to libuci's isspace(), and stopped the argument reader without
    the blank skipper passing it, so parse() looped forever, appending empty arguments."""
    with deadline(10), pytest.raises(UciSyntaxError) as err:
        parse("# exled '1'\nconfi\x1f oo 'global'\n")
    assert (err.value.line, err.value.column) == (2, 1)
    assert err.value.reason == "invalid command 'confi\\x1f'"
    with deadline(10):
        sec = one("config t\n\toption a x\x1fy\n\tlist b '1'\x1c\u00a0\u2028\n")
    assert sec.options == {"a": "x\x1fy"} and sec.lists == {"b": ["1\x1c\u00a0\u2028"]}
    assert parse(dumps(UciPackage(None, [sec]))) == UciPackage(None, [sec])


def test_checker_refuses_a_section_named_again() -> None:
    """The parser merges, as libuci does; the checker still says where, for both kinds."""
    _, problems = validate_text("config oe 'g'\nconfig dns 'd'\nconfig oe 'g'\n", "oe")
    assert [str(p) for p in problems] == [
        "oe:3: oe.g: section 'g' is defined twice (first at line 1); "
        "libuci would merge them, so write it once"
    ]
    text = "config policy\n option group clear\nconfig policy cfg016ff5\n"
    _, problems = validate_text(text, "oe")
    assert (
        3,
        "this names the unnamed section of line 1 (by the name libuci makes up for it); "
        "give that section a name instead",
    ) in [(p.line, p.message) for p in problems]
