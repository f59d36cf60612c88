"""The README's "What happens when things go wrong" and "Security" sections name tests that exist here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start: text.index("\n## ", start + 1)]


def test_every_test_the_readme_names_exists_in_the_battery() -> None:
    defined = set()
    for path in (ROOT / "tests" / "reliability").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    for title in ("What happens when things go wrong", "Security"):
        named = set(re.findall(r"`(test_\w+)`", _section(title)))
        assert named, title
        assert named <= defined, f"{title}: the README names tests that do not exist: {sorted(named - defined)}"
