"""The README's two commands are what users run and what CI runs."""

import re

from conftest import ROOT


def quick_start_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_command():
    main_job, test_command = quick_start_commands()[:2]
    assert main_job.endswith("python -m lit_iiet fit --config conf/lm/shakespeare.yaml")
    assert test_command.endswith("python -m pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
