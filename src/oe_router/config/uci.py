"""The UCI file grammar, read the way libuci (openwrt/uci, file.c) reads it, and written back.

Why our own parser: libuci is not installable here and the daemon must be able to check
a file before it replaces the running config.  The grammar rules below follow libuci's
``uci_parse_line`` / ``parse_str`` / ``parse_single_quote`` / ``parse_double_quote``:

* statements ``package NAME``, ``config TYPE [NAME]``, ``option NAME [VALUE]``,
  ``list NAME [VALUE]``; libuci also accepts the one-letter forms ``p``, ``c``, ``o``, ``l``;
* an argument is made of adjacent pieces that concatenate: unquoted text, ``'single'``
  and ``"double"`` quoted text (``'a'"b"c`` is ``abc``);
* a backslash escapes the next character in unquoted text and inside double quotes; it is
  NOT decoded (``\\n`` is the letter ``n``, libuci has a "FIXME: decode" there); a backslash
  at the end of a line joins the next line; inside single quotes a backslash is literal;
* quoted text may span lines (the newline is part of the value);
* ``#`` outside quotes starts a comment to the end of the line, even inside a word;
* ``;`` outside quotes ends a statement (libuci's unquoted ``b;`` case drops the following
  statement through a buffer-aliasing quirk; we keep the statement, as the grammar intends);
* section, option and package names are letters, digits and ``_`` (package names may
  also contain ``-``); section types are printable ASCII without spaces;
* ``option NAME ''`` deletes the option (libuci's ``uci_set`` with an empty value), so an
  option value is never empty; ``list`` items may be empty;
* ``list`` after ``option`` of the same name turns it into a list (``uci_add_list``),
  ``option`` after ``list`` replaces the list; a re-set option moves to the end.

The model is the file as written: two ``config`` statements with the same name stay two
sections here (libuci merges them at load time); the schema layer refuses that.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

__all__ = [
    "UciPackage",
    "UciSection",
    "UciSyntaxError",
    "dumps",
    "parse",
    "quote",
    "valid_name",
    "valid_package_name",
    "valid_type",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_PACKAGE_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_TYPE_RE = re.compile(r"[!-~]+\Z")
_PLAIN_RE = re.compile(r"[A-Za-z0-9_@%+,./:=\[\]-]+\Z")


def valid_name(name: str) -> bool:
    """Section and option names: libuci's uci_validate_name (alnum and '_')."""
    return bool(_NAME_RE.match(name))


def valid_package_name(name: str) -> bool:
    """Package names: like names, plus '-' (libuci's uci_validate_package)."""
    return bool(_PACKAGE_RE.match(name))


def valid_type(name: str) -> bool:
    """Section types: printable ASCII 33..126 (libuci's uci_validate_type)."""
    return bool(_TYPE_RE.match(name))


class UciSyntaxError(Exception):
    """Malformed UCI text; str() is one line: ``FILE:LINE:COLUMN: REASON``."""

    def __init__(self, filename: str, line: int, column: int, reason: str) -> None:
        super().__init__(f"{filename}:{line}:{column}: {reason}")
        self.filename = filename
        self.line = line
        self.column = column
        self.reason = reason


@dataclass
class UciSection:
    """One ``config`` statement with its options and lists, in file order.

    ``line``, ``option_lines`` and ``list_lines`` say where things were written, so the
    schema can point at them; they take no part in equality.
    """

    type: str
    name: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)
    option_lines: dict[str, int] = field(default_factory=dict, compare=False)
    list_lines: dict[str, list[int]] = field(default_factory=dict, compare=False)

    def __eq__(self, other: object) -> bool:
        # Dict equality ignores order; the model promises order, so compare item lists.
        if not isinstance(other, UciSection):
            return NotImplemented
        return (
            self.type == other.type
            and self.name == other.name
            and list(self.options.items()) == list(other.options.items())
            and list(self.lists.items()) == list(other.lists.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def set_option(self, name: str, value: str, line: int | None = None) -> None:
        """libuci uci_set: empty deletes, a re-set option moves to the end."""
        self.options.pop(name, None)
        self.option_lines.pop(name, None)
        if value == "":
            self.lists.pop(name, None)
            self.list_lines.pop(name, None)
            return
        self.lists.pop(name, None)
        self.list_lines.pop(name, None)
        self.options[name] = value
        if line is not None:
            self.option_lines[name] = line

    def add_list(self, name: str, value: str, line: int | None = None) -> None:
        """libuci uci_add_list: an existing plain option becomes the list's first item."""
        if name in self.options:
            first = self.options.pop(name)
            first_line = self.option_lines.pop(name, line or 0)
            self.lists[name] = [first]
            self.list_lines[name] = [first_line]
        self.lists.setdefault(name, []).append(value)
        self.list_lines.setdefault(name, []).append(line or 0)


@dataclass
class UciPackage:
    """A whole UCI file: the optional ``package`` name and the sections in order."""

    name: str | None = None
    sections: list[UciSection] = field(default_factory=list)
    package_line: int | None = field(default=None, compare=False)


class _Reader:
    """Cursor over the text that knows line and column of every offset."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self._starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    def where(self, pos: int) -> tuple[int, int]:
        idx = bisect.bisect_right(self._starts, pos) - 1
        return idx + 1, pos - self._starts[idx] + 1

    def error(self, pos: int, reason: str) -> UciSyntaxError:
        line, col = self.where(pos)
        return UciSyntaxError(self.filename, line, col, reason)

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def at_line_continuation(self) -> int:
        """Length of a backslash-newline (1 + 1 or 1 + 2 for CRLF) at pos, else 0."""
        if self.peek() != "\\":
            return 0
        if self.peek(1) == "\n":
            return 2
        if self.peek(1) == "\r" and self.peek(2) == "\n":
            return 3
        if self.peek(1) == "":
            return 1
        return 0


@dataclass
class _Arg:
    value: str
    pos: int


_BLANK = " \t\r\v\f"
#: C isspace() in libuci's C locale; str.isspace() also takes \x1c-\x1f and Unicode
#: spaces, which libuci keeps inside words (and which once stopped ``_read_arg`` without
#: ``_skip_blanks`` passing them: an endless loop on ``config x\x1fy``)
_SPACE = _BLANK + "\n"


def _skip_blanks(r: _Reader) -> None:
    """Skip spaces and tabs and backslash-newline joins; stop at a newline."""
    while True:
        c = r.peek()
        if c and c in _BLANK:
            r.pos += 1
        elif (n := r.at_line_continuation()) != 0:
            r.pos += n
        else:
            return


def _read_arg(r: _Reader) -> _Arg:
    """One argument: adjacent unquoted and quoted pieces, as libuci's parse_str."""
    start = r.pos
    out: list[str] = []
    while True:
        c = r.peek()
        if c == "" or c in _SPACE or c in ";#":
            return _Arg("".join(out), start)
        if c == "'":
            opened = r.pos
            end = r.text.find("'", r.pos + 1)
            if end < 0:
                raise r.error(opened, "unterminated ' quote")
            out.append(r.text[r.pos + 1 : end])
            r.pos = end + 1
        elif c == '"':
            opened = r.pos
            r.pos += 1
            while True:
                d = r.peek()
                if d == "":
                    raise r.error(opened, 'unterminated " quote')
                if d == '"':
                    r.pos += 1
                    break
                if d == "\\":
                    n = r.at_line_continuation()
                    if n:
                        r.pos += n
                        continue
                    out.append(r.peek(1))
                    r.pos += 2
                    continue
                out.append(d)
                r.pos += 1
        elif c == "\\":
            n = r.at_line_continuation()
            if n:
                r.pos += n
                continue
            out.append(r.peek(1))
            r.pos += 2
        else:
            out.append(c)
            r.pos += 1


def _read_statement_args(r: _Reader) -> list[_Arg]:
    """Arguments up to the end of the statement (newline, ';', '#' or end of text)."""
    args: list[_Arg] = []
    while True:
        _skip_blanks(r)
        c = r.peek()
        if c == "" or c == "\n":
            return args
        if c == ";":
            r.pos += 1
            return args
        if c == "#":
            end = r.text.find("\n", r.pos)
            r.pos = len(r.text) if end < 0 else end
            return args
        args.append(_read_arg(r))


_COMMANDS = {
    "package": "package",
    "p": "package",
    "config": "config",
    "c": "config",
    "option": "option",
    "o": "option",
    "list": "list",
    "l": "list",
}


def parse(text: str, filename: str = "<string>") -> UciPackage:
    """Parse UCI text into a UciPackage; raises UciSyntaxError (file, line, column)."""
    r = _Reader(text, filename)
    nul = text.find("\0")
    if nul >= 0:
        raise r.error(nul, "NUL byte in file")
    pkg = UciPackage()
    section: UciSection | None = None
    while True:
        # Skip blank space, newlines, empty statements and comments between statements.
        c = r.peek()
        if c == "":
            return pkg
        if c in _SPACE or c == ";":
            r.pos += 1
            continue
        if (n := r.at_line_continuation()) != 0:
            r.pos += n
            continue
        if c == "#":
            end = r.text.find("\n", r.pos)
            r.pos = len(text) if end < 0 else end
            continue
        stmt_pos = r.pos
        args = _read_statement_args(r)
        word = args[0]
        command = _COMMANDS.get(word.value)
        if command is None:
            raise r.error(word.pos, f"invalid command {word.value!r}")
        rest = args[1:]
        line = r.where(stmt_pos)[0]

        def need(index: int, what: str, _rest: list[_Arg] = rest, _w: _Arg = word) -> _Arg:
            if index >= len(_rest) or _rest[index].value == "":
                at = _rest[index].pos if index < len(_rest) else _w.pos
                raise r.error(at, f"{_w.value}: missing {what}")
            return _rest[index]

        def at_most(count: int, _rest: list[_Arg] = rest, _w: _Arg = word) -> None:
            if len(_rest) > count:
                raise r.error(_rest[count].pos, f"{_w.value}: too many arguments")

        if command == "package":
            name = need(0, "package name")
            at_most(1)
            if not valid_package_name(name.value):
                raise r.error(name.pos, f"invalid character in package name {name.value!r}")
            if pkg.sections or pkg.name is not None:
                raise r.error(word.pos, "package must come once, before the first config statement")
            pkg.name = name.value
            pkg.package_line = line
        elif command == "config":
            stype = need(0, "section type")
            at_most(2)
            if not valid_type(stype.value):
                raise r.error(stype.pos, f"invalid character in section type {stype.value!r}")
            sname: str | None = None
            if len(rest) > 1 and rest[1].value != "":
                sname = rest[1].value
                if not valid_name(sname):
                    raise r.error(
                        rest[1].pos,
                        f"invalid character in section name {sname!r} (use letters, digits and _)",
                    )
            section = UciSection(type=stype.value, name=sname, line=line)
            pkg.sections.append(section)
        else:
            if section is None:
                raise r.error(word.pos, f"{word.value} found before the first config section")
            oname = need(0, "option name")
            at_most(2)
            if not valid_name(oname.value):
                raise r.error(
                    oname.pos,
                    f"invalid character in option name {oname.value!r} (use letters, digits and _)",
                )
            value = rest[1].value if len(rest) > 1 else ""
            if command == "option":
                section.set_option(oname.value, value, line)
            else:
                section.add_list(oname.value, value, line)


def quote(value: str) -> str:
    """Single-quote a value as libuci's uci_escape does: ' becomes '\\''."""
    return "'" + value.replace("'", "'\\''") + "'"


def dumps(pkg: UciPackage) -> str:
    """Write a UciPackage as UCI text (the layout of ``uci export``).

    Refuses (ValueError) what libuci could not read back: bad names, NUL bytes and empty
    option values (libuci treats ``option x ''`` as a delete).
    """
    out: list[str] = []
    if pkg.name is not None:
        if not valid_package_name(pkg.name):
            raise ValueError(f"invalid package name {pkg.name!r}")
        out.append(f"package {pkg.name}\n")
    for sec in pkg.sections:
        if not valid_type(sec.type):
            raise ValueError(f"invalid section type {sec.type!r}")
        head = f"config {sec.type if _PLAIN_RE.match(sec.type) else quote(sec.type)}"
        if sec.name is not None:
            if not valid_name(sec.name):
                raise ValueError(f"invalid section name {sec.name!r}")
            head += f" {quote(sec.name)}"
        out.append("\n" + head + "\n")
        for name, value in sec.options.items():
            _check_value(name, value)
            if value == "":
                raise ValueError(f"option {name!r} is empty; UCI cannot store an empty option")
            out.append(f"\toption {name} {quote(value)}\n")
        for name, items in sec.lists.items():
            for item in items:
                _check_value(name, item)
                out.append(f"\tlist {name} {quote(item)}\n")
    return "".join(out)


def _check_value(name: str, value: str) -> None:
    if not valid_name(name):
        raise ValueError(f"invalid option name {name!r}")
    if "\0" in value:
        raise ValueError(f"option {name!r} contains a NUL byte")
