"""The README's set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("lora-cpt demo")
    assert "pytest" in block[1]
    ci_lines = [x.strip() for x in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert block[1] in ci_lines
