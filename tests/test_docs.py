"""The README and docs/ as a newcomer reads them: every link and every result file they cite exists, and the README
fits on a screen or two."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_and_cited_result_file_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):  # [text](path) and ![alt](path)
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}: link {target}")
        for cited in set(re.findall(r"bench/results/[A-Za-z0-9_.\-]+\.json", text)):
            if not (REPO / cited).exists():
                missing.append(f"{doc.name}: result file {cited}")
    assert not missing, missing


def test_the_readme_fits_on_a_screen_or_two():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 80, len(lines)
    assert "python -m pytest -q -rs" in "\n".join(lines)  # the command CI runs (.ci/run)
    assert "-m \"not slow\"" in "\n".join(lines)
