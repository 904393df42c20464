"""The documentation keeps its promises: README stays short, every docs/FORMATS.md label the code cites exists,
links between documents resolve, and nothing cites a file outside the repository or an issue number."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CITATION = re.compile(
    r"docs/FORMATS\.md(?:,| section| sections)?\s+((?:[A-H]\.\d+|[A-H]\b|Pitfall \d+|pitfalls? \d+)"
    r"(?:(?:,|, and| and|-)\s*(?:[A-H]\.\d+|\d+|Pitfall \d+))*)"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked(*patterns: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, timeout=30)
    return [REPO / name for name in names.stdout.split()]


def formats_headings() -> set[str]:
    text = (REPO / "docs" / "FORMATS.md").read_text()
    labels = set()
    for line in text.splitlines():
        found = re.match(r"#{2,3} (?:([A-H](?:\.\d+)?)[ .]|Pitfall (\d+):)", line)
        if found:
            labels.add(found[1] if found[1] else f"Pitfall {found[2]}")
    return labels


def cited_labels(text: str) -> set[str]:
    labels = set()
    for match in CITATION.finditer(text):
        words = match[1]
        if re.match(r"(?i)pitfalls? ", words):
            numbers = [int(n) for n in re.findall(r"\d+", words)]
            if "-" in words and len(numbers) == 2:
                numbers = list(range(numbers[0], numbers[1] + 1))
            labels |= {f"Pitfall {n}" for n in numbers}
        else:
            labels |= set(re.findall(r"[A-H]\.\d+|Pitfall \d+", words)) or {words.strip()[0]}
    return labels


def test_readme_is_short_and_points_onwards() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for doc in ("docs/GUIDE.md", "docs/REFERENCE.md", "docs/API.md", "docs/ARCHITECTURE.md", "CONTRIBUTING.md"):
        assert doc in readme, doc


def test_every_formats_label_the_code_cites_exists() -> None:
    headings = formats_headings()
    assert {"A.2", "B.1", "C.5", "Pitfall 1"} <= headings
    cited: dict[str, set[str]] = {}
    for path in tracked("qcrypt", "tests", "scripts"):
        if path.suffix in (".py", "") and path.is_file():
            for label in cited_labels(path.read_text(errors="replace")):
                cited.setdefault(label, set()).add(path.name)
    assert len(cited) > 10  # the citations were found
    missing = {label: sorted(files) for label, files in cited.items() if label not in headings}
    assert not missing, missing


def test_links_between_documents_resolve() -> None:
    broken = []
    for doc in tracked("*.md"):
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_nothing_cites_outside_the_repository_or_an_issue_number() -> None:
    outside = re.compile(r"\.\./shared|/work/shared")
    issue = re.compile(r"\b[Ii]ssue[ -#]?\d+\b|\(#\d+\)")
    offenders = []
    for path in tracked("*.md", "qcrypt", "tests", "scripts", "ansible", ".ci"):
        if not path.is_file() or path.suffix in (".gz", ".so", ".qcow2", ".raw", ".luks"):
            continue
        text = path.read_text(errors="replace")
        if path.name != "test_docs.py" and (outside.search(text) or issue.search(text)):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
