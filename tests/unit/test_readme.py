"""The README's commands are the ones CI runs: a fresh machine follows the README, CI follows
`.ci/run`, and the two must not drift apart."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The README's indented command lines (a line of four spaces, then a command)."""
    return [line.strip() for line in (REPO / "README.md").read_text().splitlines()
            if re.match(r"^    (python3 |\.venv/bin/)", line)]


def test_ci_runs_the_readmes_install_and_test_command():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1, ci
    assert ci[0] in readme_commands(), f"{ci[0]!r} is not a command of the README"
    # The suite runs on two processes, each with a Ray of its own; a test file's module
    # fixtures (one cluster, one worker group) stay in one process.
    assert "-n 2 --dist loadfile" in ci[0] and "--durations=15" in ci[0]


def test_the_readme_installs_and_runs_the_main_job_in_one_command():
    main = [c for c in readme_commands() if c.endswith(".venv/bin/raydeep run")]
    assert len(main) == 1 and "pip install torch==2.13.0 -e" in main[0], readme_commands()
