"""The README's promises that can be checked mechanically."""

import re
from pathlib import Path

from distvgg.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_two_commands_at_the_top_and_ci_runs_the_test_command():
    top = README.split("\n## ", 1)[0]
    blocks = bash_blocks(top)
    assert len(blocks) == 2, "the README starts with exactly two commands"
    train, test = blocks
    assert "distvgg.train" in train and "pip install" in train
    assert "pytest" in test and "pip install" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_every_option_is_documented():
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in README, f"--{name} is missing from the README"
