"""What a user sees when /etc/config/oe is wrong: one line per problem, all of them at once."""

from __future__ import annotations

from oe_router.records import record

__all__ = ["ConfigInvalid", "ConfigProblem"]


@record(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file.

    ``option`` is the UCI path (``oe.dns.hold_limit``, ``oe.@policy[0].dest``) or None for
    file-level problems; ``message`` already names the bad value and what is allowed;
    ``column`` is set for syntax errors only.
    """

    file: str
    line: int | None
    option: str | None
    value: str | None
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where, self.option, self.message] if self.option else [where, self.message]
        # One line, whatever the file name or message holds.
        return ": ".join(parts).replace("\r", "\\r").replace("\n", "\\n")


class ConfigInvalid(Exception):
    """A config that must not be used; str() lists every problem, one per line."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
