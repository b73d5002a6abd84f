"""The README stays a ten-minute read and points at pages that exist; the docs site lists them.

The reference material lives in the MkDocs site under ``docs/`` (``mkdocs build --strict``
checks its own links and the API pages); these tests guard what mkdocs does not see: the
README's length and links, and that no page is left out of the navigation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move reference material to docs/"


def test_readme_links_point_at_committed_files():
    missing = []
    for target in LINK.findall(README.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (ROOT / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"README links to missing files: {missing}"


def test_every_docs_page_is_in_the_nav():
    """A page outside ``nav`` builds but no reader finds it."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages
    left_out = [p for p in pages if not re.search(rf"(?m)^\s*- (?:[^:\n]+: )?{re.escape(p)}$", nav)]
    assert not left_out, f"docs pages missing from mkdocs.yml's nav: {left_out}"


def test_architecture_page_states_the_import_graph_counts():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_graph.py"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(out.stdout)
    want = {
        "modules": counts["modules"],
        "joules → joules imports": counts["edges"],
        "upward imports": counts["upward_count"],
        "module cycles": len(counts["module_cycles"]),
        "layer cycles": len(counts["layer_cycles"]),
        "function-local joules imports": counts["function_local_count"],
        "of those outside `cli/`": counts["function_local_outside_cli"],
    }
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page.split("<!-- import-graph -->", 1)[1].split("\n\n", 1)[0]
    shown = {
        cells[0]: int(cells[1])
        for line in table.strip().splitlines()[2:]
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert shown == want
    assert counts["upward_count"] == 0 and not counts["module_cycles"]
