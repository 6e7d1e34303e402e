"""The README's quickstart is executed, so it cannot rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under ## Quickstart"
    return match.group(1)


def test_quickstart_runs(capsys):
    code = quickstart_code()
    assert len(code.strip().splitlines()) <= 30
    exec(compile(code, "README quickstart", "exec"), {"__name__": "__quickstart__"})
    assert capsys.readouterr().out.strip()
