"""docs/tutorial.md runs as written, its pictures written into a temporary directory."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
OUT = 'out = Path("docs/tutorial")'


def test_the_tutorial_runs_as_written_and_draws_each_step(tmp_path):
    text = TUTORIAL.read_text()
    session = "\n".join(re.findall(r"```pycon\n(.*?)```", text, re.S))
    assert session.count(OUT) == 1, "the tutorial no longer names its picture folder"
    session = session.replace(OUT, f"out = Path({str(tmp_path)!r})")
    test = doctest.DocTestParser().get_doctest(session, {}, "tutorial.md", str(TUTORIAL), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 30 and result.failed == 0, result
    shown = re.findall(r"\]\(tutorial/([^)]+\.png)\)", text)
    assert len(shown) >= 5
    assert sorted(shown) == sorted(p.name for p in tmp_path.glob("*.png"))  # each one drawn
    for name in shown:  # and committed beside the page
        assert (TUTORIAL.parent / "tutorial" / name).stat().st_size > 1000, name
