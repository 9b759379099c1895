"""The README starts with exactly two set-up commands, and .ci/run runs those same lines."""

from __future__ import annotations

import re

from st_common import REPO


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "README has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_ci_runs_them():
    commands = _setup_commands()
    assert len(commands) == 2
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f"{command!r} is not run by .ci/run"
    assert "pytest" in commands[1]
