"""The README's library session runs as written, and prints what it says it prints."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_session_runs_as_written():
    text = README.read_text()
    blocks = re.findall(r"```pycon\n(.*?)```", text, re.S)
    assert blocks, "the README has no pycon session"
    parser = doctest.DocTestParser()
    test = parser.get_doctest("\n".join(blocks), {}, "README.md", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 30 and result.failed == 0, result


def test_the_readme_names_no_file_outside_the_repository():
    assert "../shared" not in README.read_text()
