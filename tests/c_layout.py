"""What a C compiler says of structure layouts: the check behind every ``cabi`` binding.

Each binding's test names the numbers it expects (``"offsetof S f"`` -> 16) and the C
expression that computes each; this compiles one program printing them all for an ABI
(``-m64``/``-m32``) and returns what it printed, to compare with the Python layout.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def gcc_numbers(
    exprs: Mapping[str, str], prelude: str, includes: Sequence[Path], flag: str, work: Path
) -> dict[str, int]:
    """``{key: value of exprs[key]}`` as gcc ``flag`` computes them after ``prelude``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (scripts/apt-packages.txt lists gcc-multilib)")
    lines = [f'    printf("%s %lu\\n", "{k}", (unsigned long){e});' for k, e in exprs.items()]
    src = work / "layout.c"
    src.write_text(
        "#include <stdio.h>\n" + prelude + "int main(void) {\n" + "\n".join(lines) + "\n}\n"
    )
    exe = work / "layout"
    flags = [a for inc in includes for a in ("-I", str(inc))]
    res = subprocess.run(
        [gcc, flag, "-Wall", *flags, str(src), "-o", str(exe)], capture_output=True, text=True
    )
    assert res.returncode == 0, f"gcc {flag} failed (gcc-multilib installed?):\n{res.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}
