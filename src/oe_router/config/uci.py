"""The UCI file grammar, read the way libuci (openwrt/uci, file.c) reads it, and written back.

Why our own parser: the daemon must check a file before it replaces the running config, on
any host. On a router libuci reads the same file for every other tool, so this parser
follows libuci to the letter, quirks included; tests/host/test_uci_libuci.py holds it
against the real libuci (built from source) on fixtures and generated files.

libuci reads a line at a time and parses it in place:

* statements ``package NAME``, ``config TYPE [NAME]``, ``option NAME [VALUE]``,
  ``list NAME [VALUE]``, also as ``p``, ``c``, ``o``, ``l``. The command word ends at a
  space or tab only and is taken as written: ``'config'``, ``config\\vx``, a lone ``;`` or
  a backslash at the start of a statement are invalid commands;
* an argument is made of adjacent pieces that concatenate: unquoted text, ``'single'``
  and ``"double"`` quoted text (``'a'"b"c`` is ``abc``); arguments are separated by C
  isspace() characters (space, tab, CR, VT, FF);
* a backslash escapes the next character in unquoted text and inside double quotes; it is
  NOT decoded (``\\n`` is the letter ``n``, libuci has a "FIXME: decode" there); a backslash
  at the end of a line joins the next line; inside single quotes a backslash is literal;
* quoted text may span lines (the newline is part of the value);
* ``#`` outside quotes starts a comment to the end of the line, even inside a word;
* ``;`` ends a statement, the libuci way: a ``;`` where an argument would start fills
  that argument with nothing (so ``config t ; option a b`` has one argument too many);
  after quoted or escaped text it ends the argument; straight after plain unquoted text
  it ends the whole line, the rest being lost (libuci writes the word's terminator over
  it: ``option a b;option c d`` sets only ``a``); a line may not end in ``;``;
* section, option and package names are letters, digits and ``_`` (package names may
  also contain ``-``); section types are printable ASCII without spaces;
* ``option NAME ''`` (or no value) does nothing in a file: it neither sets nor deletes;
  ``list`` items may be empty;
* ``list`` after ``option`` of the same name turns it into a list in the option's place
  (``uci_add_list``), ``option`` after ``list`` replaces the list; a value set again keeps
  its place;
* a ``config`` statement with a name seen before continues that section (refused with a
  different type, as strict libuci does), also when the name is the one libuci makes up
  for an unnamed section (``cfg`` + its number + a hash of its type); the section records
  the lines that named it again (``reopened``) and the schema refuses them;
* a ``package`` statement may come anywhere; the first one names the package.

One deliberate difference: a NUL byte is refused. libuci reads lines with fgets() and
strlen(), so it silently loses the rest of the line after a NUL.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import field

from oe_router.records import record

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


@record
class UciSection:
    """One section with its options and lists, as libuci holds it after loading.

    ``line``, ``option_lines``, ``list_lines`` and ``reopened`` (lines where a ``config``
    statement named this section again) say where things were written, so the schema can
    point at them; they take no part in equality. Options and lists are kept in libuci's
    order: a value set again, or an option turned into a list, keeps its place.
    """

    type: str
    name: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)
    option_lines: dict[str, int] = field(default_factory=dict, compare=False)
    list_lines: dict[str, list[int]] = field(default_factory=dict, compare=False)
    reopened: list[int] = field(default_factory=list, compare=False)
    #: option and list names in libuci's one order (options and lists share it)
    _order: list[str] = field(default_factory=list, compare=False, repr=False)

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

    def _sync_order(self) -> None:
        """Names set through the constructor join the order (options first, then lists)."""
        known = set(self._order)
        if len(known) != len(self.options) + len(self.lists):
            live = self.options.keys() | self.lists.keys()
            self._order = [n for n in self._order if n in live]
            self._order += [n for n in [*self.options, *self.lists] if n not in known]

    def _regroup(self) -> None:
        """Rebuild both dicts in the shared order after an option became a list or back."""
        self.options = {n: self.options[n] for n in self._order if n in self.options}
        self.lists = {n: self.lists[n] for n in self._order if n in self.lists}

    def set_option(self, name: str, value: str, line: int | None = None) -> None:
        """libuci uci_set: an empty value deletes; a value set again keeps its place."""
        self._sync_order()
        if value == "":
            self.options.pop(name, None)
            self.option_lines.pop(name, None)
            self.lists.pop(name, None)
            self.list_lines.pop(name, None)
            if name in self._order:
                self._order.remove(name)
            return
        was_list = self.lists.pop(name, None) is not None
        self.list_lines.pop(name, None)
        if name not in self._order:
            self._order.append(name)
        self.options[name] = value
        if line is not None:
            self.option_lines[name] = line
        if was_list:
            self._regroup()

    def add_list(self, name: str, value: str, line: int | None = None) -> None:
        """libuci uci_add_list: an existing plain option becomes the list's first item,
        in the option's place."""
        self._sync_order()
        if name in self.options:
            first = self.options.pop(name)
            first_line = self.option_lines.pop(name, line or 0)
            self.lists[name] = [first]
            self.list_lines[name] = [first_line]
            self._regroup()
        elif name not in self._order:
            self._order.append(name)
        self.lists.setdefault(name, []).append(value)
        self.list_lines.setdefault(name, []).append(line or 0)


@record
class UciPackage:
    """A whole UCI file: the optional ``package`` name and the sections in order."""

    name: str | None = None
    sections: list[UciSection] = field(default_factory=list)
    package_line: int | None = field(default=None, compare=False)


class _Buffer:
    """libuci's line buffer, over the whole text.

    libuci reads one line at a time and parses it in place: ``[pos, end)`` is what is left
    of the current line. A backslash-newline or a quote left open appends the next line
    (``extend``); a ``#`` outside quotes, or a ``;`` straight after unquoted text (libuci
    writes the word's terminating NUL over it), ends the line early (``cut``). ``line_end``
    is where the next line starts whatever was cut.
    """

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.pos = self.end = self.line_end = 0
        self._starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    def where(self, pos: int) -> tuple[int, int]:
        idx = bisect.bisect_right(self._starts, pos) - 1
        return idx + 1, pos - self._starts[idx] + 1

    def error(self, pos: int, reason: str) -> UciSyntaxError:
        line, col = self.where(pos)
        return UciSyntaxError(self.filename, line, col, reason)

    def _line_after(self, start: int) -> int:
        nl = self.text.find("\n", start)
        return len(self.text) if nl < 0 else nl + 1

    def next_line(self) -> bool:
        """Start on the next line; False at the end of the text."""
        self.pos = self.line_end
        if self.pos >= len(self.text):
            return False
        self.end = self.line_end = self._line_after(self.pos)
        return True

    def extend(self) -> bool:
        """Append the next line (pos is at the end of this one); False at the end of text."""
        if self.line_end >= len(self.text):
            return False
        self.pos = self.line_end
        self.end = self.line_end = self._line_after(self.pos)
        return True

    def cut(self) -> None:
        self.end = self.pos

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < self.end else ""


@record
class _Arg:
    value: str
    pos: int


#: C isspace() in libuci's C locale; str.isspace() also takes \x1c-\x1f and Unicode
#: spaces, which libuci keeps inside words (and which once stopped the argument reader
#: without the blank skipper passing them: an endless loop on ``config x\x1fy``)
_SPACE = " \t\n\r\v\f"


def _skip_space(b: _Buffer) -> None:
    while (c := b.peek()) and c in _SPACE:
        b.pos += 1


def _backslash(b: _Buffer) -> bool:
    """Step over a backslash: True if the next character is to be taken as it is, False
    if the backslash ended the line and so joined the next one."""
    b.pos += 1
    c = b.peek()
    if c == "\n" or c == "" or (c == "\r" and b.peek(1) == "\n" and b.peek(2) == ""):
        b.pos = b.end
        b.extend()
        return False
    return True


def _take(b: _Buffer, out: list[str]) -> None:
    """The character at pos; a backslash takes the one after it as it is, or joins lines."""
    if b.peek() != "\\" or _backslash(b):
        out.append(b.peek())
        b.pos += 1


def _single_quote(b: _Buffer, out: list[str]) -> None:
    """'text': literal up to the next quote, across lines."""
    close = b.text.find("'", b.pos + 1)
    if close < 0:
        raise b.error(b.pos, "unterminated ' quote")
    out.append(b.text[b.pos + 1 : close])
    b.pos = close + 1
    if close >= b.end:
        b.end = b.line_end = b._line_after(close)


def _double_quote(b: _Buffer, out: list[str]) -> None:
    """ "text": a backslash takes the next character as it is (not decoded) or joins lines."""
    opened = b.pos
    b.pos += 1
    while True:
        c = b.peek()
        if c == '"':
            b.pos += 1
            return
        if c == "":
            if not b.extend():
                raise b.error(opened, 'unterminated " quote')
        else:
            _take(b, out)


def _read_str(b: _Buffer) -> str:
    """One argument: adjacent unquoted and quoted pieces, up to a space, ``;``, ``#`` or
    the end of the line (libuci's parse_str)."""
    out: list[str] = []
    plain = True  # nothing quoted or escaped yet: libuci's output still overlays its input
    while True:
        c = b.peek()
        if c == "'":
            plain = False
            _single_quote(b, out)
        elif c == '"':
            plain = False
            _double_quote(b, out)
        elif c == "#":
            b.cut()
            return "".join(out)
        elif c == "":
            return "".join(out)
        elif c == ";":
            if plain:
                b.cut()  # overwritten by the terminator: the rest of the line is lost
            return "".join(out)
        else:
            plain = plain and c != "\\"
            _take(b, out)
        c = b.peek()
        if c == "" or c in _SPACE:
            if c:
                b.pos += 1
            return "".join(out)


def _next_arg(b: _Buffer) -> _Arg:
    """The next argument; a ``;`` where one starts is taken as an empty one."""
    _skip_space(b)
    start = b.pos
    if b.peek() == ";":
        b.pos += 1
        return _Arg("", start)
    return _Arg(_read_str(b), start)


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


@record
class _State:
    pkg: UciPackage
    section: UciSection | None = None
    #: sections by name, the first of a name winning, as libuci's lookup finds them;
    #: unnamed ones under the name libuci makes up for them
    named: dict[str, UciSection] = field(default_factory=dict)
    count: int = 0  # sections made so far (libuci's n_section)


def _made_up_name(count: int, stype: str) -> str:
    """libuci's name for the count-th section when it has none: ``cfg``, the count and a
    djb hash of the type (the section has no options yet when it is named)."""
    h = 5381
    for byte in stype.encode():
        h = (h * 33 + byte) & 0xFFFFFFFF
    return f"cfg{count:02x}{(h & 0x7FFFFFFF) % 65536:04x}"


def parse(text: str, filename: str = "<string>") -> UciPackage:
    """Parse UCI text into a UciPackage; raises UciSyntaxError (file, line, column)."""
    b = _Buffer(text, filename)
    nul = text.find("\0")
    if nul >= 0:
        raise b.error(nul, "NUL byte in file")
    pkg = UciPackage()
    state = _State(pkg)
    while b.next_line():
        _skip_space(b)
        while _statement(b, state):
            pass
    return pkg


def _statement(b: _Buffer, state: _State) -> bool:
    """One statement from the current line (libuci's uci_parse_line loop); False at its end.

    The command word is split off at a space or tab only (libuci's strtok), so it is taken
    as written: no quotes, escapes or other blanks.
    """
    while (c := b.peek()) and c in " \t":
        b.pos += 1
    start = b.pos
    if start >= b.end:
        return False
    stop = start
    while stop < b.end and b.text[stop] not in " \t":
        stop += 1
    word = b.text[start:stop]
    if word.startswith("#"):
        return False
    bare = word.rstrip("\r\n")  # a word that ends the line has no argument after it
    command = _COMMANDS.get(bare)
    if command is None:
        if bare == "":  # libuci's strtok hands it the newline as a word
            raise b.error(start, "a ';' must be followed by a statement on the same line")
        raise b.error(start, f"invalid command {bare!r}")
    if command in ("option", "list") and state.section is None:
        raise b.error(start, f"{bare} found before the first config section")
    line = b.where(start)[0]
    if stop >= b.end or bare != word:
        raise b.error(start, f"{bare}: missing {_FIRST[command]}")
    b.pos = stop + 1
    first = _next_arg(b)
    if first.value == "":
        at = first.pos if first.pos < b.end else start
        raise b.error(at, f"{word}: missing {_FIRST[command]}")
    if command == "package":
        if not valid_package_name(first.value):
            raise b.error(first.pos, f"invalid character in package name {first.value!r}")
        _end_of_statement(b, word)
        if state.pkg.name is None:
            state.pkg.name = first.value
            state.pkg.package_line = line
        return True
    if command == "config":
        if not valid_type(first.value):
            raise b.error(first.pos, f"invalid character in section type {first.value!r}")
    elif not valid_name(first.value):
        raise b.error(
            first.pos,
            f"invalid character in option name {first.value!r} (use letters, digits and _)",
        )
    second = _next_arg(b)
    if command == "config" and second.value and not valid_name(second.value):
        raise b.error(
            second.pos,
            f"invalid character in section name {second.value!r} (use letters, digits and _)",
        )
    _end_of_statement(b, word)
    if command == "config":
        _open_section(b, state, first, second.value or None, line)
    elif state.section is not None:
        if command == "option":
            # In a file libuci's uci_set gets an empty value for an option it has not
            # looked up completely, and so does nothing: no delete (``uci set`` deletes).
            if second.value:
                state.section.set_option(first.value, second.value, line)
        else:
            state.section.add_list(first.value, second.value, line)
    return True


_FIRST = {
    "package": "package name",
    "config": "section type",
    "option": "option name",
    "list": "option name",
}


def _end_of_statement(b: _Buffer, word: str) -> None:
    extra = _next_arg(b)
    if extra.value:
        raise b.error(extra.pos, f"{word}: too many arguments")


def _open_section(b: _Buffer, state: _State, stype: _Arg, name: str | None, line: int) -> None:
    """A new section, or, for a name seen before, that section again (libuci merges them;
    in its default strict mode only when the type is the same). The name may also be the
    one libuci made up for an unnamed section: that section is continued too."""
    if name is not None and (seen := state.named.get(name)) is not None:
        if seen.type != stype.value:
            raise b.error(
                stype.pos,
                f"section {name!r} was opened as {seen.type!r} at line {seen.line}; "
                f"libuci refuses another type for the same name",
            )
        seen.reopened.append(line)
        state.section = seen
        return
    state.section = UciSection(type=stype.value, name=name, line=line)
    state.pkg.sections.append(state.section)
    state.count += 1
    state.named.setdefault(name or _made_up_name(state.count, stype.value), state.section)


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
