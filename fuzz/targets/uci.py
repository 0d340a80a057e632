"""Fuzz target: the UCI parser (``config/uci.py``), its writer and config validation.

Input: the bytes of /etc/config/oe. Oracles: decoding and validation report problems,
never raise (``oe config check`` must answer for any file); a parsed package that
``dumps`` accepts reads back equal (the writer and the parser agree).
"""

from __future__ import annotations

from fuzz.common import fuzz_main, instrumented

with instrumented():
    from oe_router.config.uci import UciSyntaxError, dumps, parse
    from oe_router.config.validate import validate_text


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # refused before parsing, as config.check_config does
    config, problems = validate_text(text, "/etc/config/oe")
    assert (config is None) == bool(problems), (config, problems)
    for p in problems:
        assert "\n" not in str(p), p  # one line per problem
    try:
        pkg = parse(text, "fuzz")
    except UciSyntaxError:
        return
    try:
        written = dumps(pkg)
    except ValueError:
        return  # what libuci could not read back (NUL bytes, empty options)
    again = parse(written, "written")
    assert again == pkg, f"write/read round trip changed the package:\n{written}"


if __name__ == "__main__":
    fuzz_main(test_one_input)
