"""The README's set-up commands are the ones CI runs, and the docs name real commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def setup_commands() -> list[str]:
    return re.findall(r"```bash\n(pip install [^\n]+)\n```", README)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert "lmforge run examples/quickstart.yaml" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci


def test_every_command_in_the_readme_table_exists() -> None:
    documented = set(re.findall(r"^\| `lmforge ([a-z-]+)", README, flags=re.M))
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "--help"], capture_output=True, text=True)
    for command in documented:
        assert command in result.stdout, command


def test_documented_exit_codes_match_the_code() -> None:
    from lmforge import exitcodes

    table = dict(re.findall(r"^\| (\d+) \| ([^|]+)\|", README, flags=re.M))
    for code in (exitcodes.OK, exitcodes.PROBLEMS_FOUND, exitcodes.USAGE, exitcodes.RETRYABLE, exitcodes.INVALID_SPEC):
        assert str(code) in table
    from lmforge.trainer.loop import PREEMPTED_EXIT

    assert str(PREEMPTED_EXIT) in table
