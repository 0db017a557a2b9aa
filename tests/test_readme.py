"""The README's Python examples run as written, and every one of them is found.

A section's example is its Python blocks in order: a later block continues the one before it
(the AMP recipe of "Use" reuses that section's model, optimizer and regularizer).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```$", flags=re.S | re.M)

# The sections with a Python example, in README order, and the number of blocks of each.
EXAMPLE_BLOCKS = {"Use": 2, "Train, threshold, prune": 3, "Sparsity in the optimizer step": 2}


def fenced_blocks(text: str):
    """[(section heading, language, code)] of every fenced block, in order."""
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^#{2,} (.+)$", text, flags=re.M)]
    blocks = []
    for m in FENCE.finditer(text):
        section = [title for start, title in headings if start < m.start()]
        blocks.append((section[-1] if section else None, m.group(1), m.group(2)))
    return blocks


BLOCKS = fenced_blocks(README.read_text())
EXAMPLES = {}  # section: its Python blocks, joined in order
for _section, _language, _code in BLOCKS:
    if _language == "python":
        EXAMPLES[_section] = EXAMPLES.get(_section, "") + _code


def test_readme_has_examples():
    python = [section for section, language, _ in BLOCKS if language == "python"]
    assert python == [s for s, count in EXAMPLE_BLOCKS.items() for _ in range(count)]
    # No example hides from the test in a block without the python tag.
    for section, language, code in BLOCKS:
        if language != "python":
            assert language in ("", "bash"), (section, language)
            assert not re.search(r"^(import|from) \w", code, flags=re.M), section


def test_fenced_blocks_parses_sections_and_languages():
    text = "## A\n```python\nx = 1\n```\n## B\n### C\n```\ntree\n```\n```bash\nls\n```\n"
    assert fenced_blocks(text) == [
        ("A", "python", "x = 1\n"),
        ("C", "", "tree\n"),
        ("C", "bash", "ls\n"),
    ]


@pytest.mark.parametrize("section", list(EXAMPLE_BLOCKS))
def test_readme_example_runs(section, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLES[section]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
