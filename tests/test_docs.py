"""The documentation: its code runs, and the site builds in strict mode.

Executed snippets. Every fenced block that opens with ```` ```python ```` in ``docs/**/*.md`` is
code the docs claim works, so it is run:

- The blocks of one page run in order, in one fresh Python process (a page is read like a
  session: a later block may use the names an earlier one defined), with the working directory a
  new temporary folder (a snippet's ``runs/...`` lands there) and ``OMP_NUM_THREADS=1``.
- A block is *not* run when the line right before its opening fence is ``<!-- not-run -->``: the
  convention for another library's code (the migration pages) and for fragments shown for their
  shape only. Only ```` ```python ```` blocks count; ```` ```sh ````, ```` ```toml ```` and the
  like are never run.
- A block whose preceding line is ``<!-- needs-data -->`` reads real data through
  ``$INNERLOOP_DATA``; a page with such a block is skipped when ``$INNERLOOP_DATA`` is not set or
  not a folder (and runs, with it, in CI). Such pages read real data files, so their test is
  marked ``slow``, as is the strict site build.

Each block must run in a few seconds on a CPU: the docs use small iteration counts and say in
prose what a real run uses. A failure names the page and the line of the block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_RUN = "<!-- not-run -->"
NEEDS_DATA = "<!-- needs-data -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, the 1-based line of its opening fence, its marker."""

    lang: str
    line: int
    code: str
    marker: str


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown page, with the marker comment on the line before it."""
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        prev = lines[i - 1].strip() if i > 0 else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence at line {i + 1}")
        out.append(Block(lang, i + 1, "\n".join(body) + "\n", prev if prev in (NOT_RUN, NEEDS_DATA) else ""))
        i = j + 1
    return out


def executed(page: Path) -> list[Block]:
    """The blocks of ``page`` that the tests run."""
    return [b for b in blocks(page.read_text()) if b.lang == "python" and b.marker != NOT_RUN]


PAGES = sorted(p for p in DOCS.rglob("*.md") if executed(p))


def script(page: Path, chosen: list[Block]) -> str:
    """One script of the page's blocks, each announced so that a traceback names its line."""
    rel = page.relative_to(ROOT)
    parts = []
    for b in chosen:
        parts.append(f"print({f'--- {rel}:{b.line}'!r}, flush=True)\n"
                     f"exec(compile({b.code!r}, {f'{rel}:{b.line}'!r}, 'exec'))\n")
    return "".join(parts)


def test_the_block_parser_reads_markers_and_languages() -> None:
    text = "\n".join([
        "```python", "a = 1", "```", "", NOT_RUN, "```python", "import learn2learn", "```",
        NEEDS_DATA, "```python", "b = 2", "```", "```sh", "make docs", "```",
        "- item", "    ```python", "    c = 3", "    ```",
    ])
    got = [(b.lang, b.line, b.code, b.marker) for b in blocks(text)]
    assert got == [("python", 1, "a = 1\n", ""), ("python", 6, "import learn2learn\n", NOT_RUN),
                   ("python", 10, "b = 2\n", NEEDS_DATA), ("sh", 13, "make docs\n", ""),
                   ("python", 17, "c = 3\n", "")]
    with pytest.raises(ValueError, match="unclosed code fence at line 1"):
        blocks("```python\nx = 1\n")


def test_the_pages_with_code_are_found() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "tutorial.md", "migration/learn2learn.md", "guides/tuning.md", "guides/continual.md",
            "guides/predict.md", "guides/fewshot-benchmarks.md"} <= names


def test_every_migration_page_shows_the_other_library_unrun_and_innerloop_run() -> None:
    for page in sorted((DOCS / "migration").glob("*.md")):
        found = [b for b in blocks(page.read_text()) if b.lang == "python"]
        assert any(b.marker == NOT_RUN for b in found), f"{page.name}: no other-library block"
        assert any(b.marker != NOT_RUN for b in found), f"{page.name}: no executed innerloop block"


def needs_data(page: Path) -> bool:
    return any(b.marker == NEEDS_DATA for b in executed(page))


@pytest.mark.parametrize("page", [
    pytest.param(p, id=p.relative_to(DOCS).as_posix(), marks=[pytest.mark.slow] if needs_data(p) else [])
    for p in PAGES
])
def test_the_page_runs(page: Path, tmp_path: Path) -> None:
    chosen = executed(page)
    data = os.environ.get("INNERLOOP_DATA")
    if needs_data(page) and not (data and Path(data).is_dir()):
        pytest.skip(f"{page.relative_to(ROOT)} reads real data: set $INNERLOOP_DATA to run it")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    if data:
        env["INNERLOOP_DATA"] = str(Path(data).resolve())
    proc = subprocess.run([sys.executable, "-c", script(page, chosen)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{page.relative_to(ROOT)} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")


def test_every_results_file_has_its_command_in_the_reproducing_guide() -> None:
    guide = (DOCS / "guides" / "reproducing.md").read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks" / "results").glob("*.md")) if p.name not in guide]
    assert not missing, f"docs/guides/reproducing.md does not name {missing}: add each with its command"


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "adapt" / "index.html").is_file()
