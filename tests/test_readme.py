"""The README's promises that can be checked mechanically."""

import re
from pathlib import Path

from distvgg.config import TrainConfig, build_parser, field_docs

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
    assert 'python -m pytest -m "not slow"' in top  # the quick tier
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run the README's test command verbatim"
    assert "ruff check" in ci and "ruff format --check" in ci


def test_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 200
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / link).exists(), f"the README links to {link}, which does not exist"


def test_every_option_has_help():
    """--help is the option reference: every field has its docstring, shown by the parser."""
    docs = field_docs(TrainConfig)
    help_text = " ".join(build_parser().format_help().split())
    for name in TrainConfig.__dataclass_fields__:
        assert docs.get(name), f"--{name} has no docstring"
        assert f"--{name.replace('_', '-')}" in help_text
