"""The README and docs/ as a whole: every command a user is told to run is tested, the README stays
a short guide, links resolve, and dated notes stay in docs/log.md and the performance captions.

Fast: reads files only, starts nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def _root() -> Path:
    here = Path(__file__).resolve().parent
    return next(p for p in (here, *here.parents) if (p / "pyproject.toml").is_file())


ROOT = _root()
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LOG = DOCS / "log.md"
PERFORMANCE = DOCS / "performance.md"
README_MAX_LINES = 250
# The reference pages the README must lead to (one subject each).
REQUIRED_PAGES = ("api", "models", "deploy", "performance", "operations", "development", "log")

MARKER = re.compile(r"^<!-- readme-test: (\S+) -->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGS = {"sh", "shell", "console", "zsh", "shell-session"}
DATE = re.compile(r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01]))?\b")
NOTEBOOK = re.compile(r"\b(?:today|yesterday|this session|earlier sessions?)\b", re.I)
# A figure's caption: machine, date, commit (or "not recorded") and the command that measures it.
CAPTION = re.compile(r"^\s*Machine: .+ · date: \d{4}-\d\d-\d\d · commit: .+ · command: `[^`]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fences(lines: list[str]) -> list[tuple[int, int, str]]:
    """Fenced blocks as (opening line index, closing line index, info string)."""
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, end = m.group(2), i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        blocks.append((i, end, m.group(3).lower()))
        i = end + 1
    return blocks


def _prose(page: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced blocks, inline code removed."""
    lines = page.read_text().splitlines()
    inside = set()
    for start, end, _ in _fences(lines):
        inside.update(range(start, end + 1))
    return [(n + 1, re.sub(r"`[^`]*`", "", line)) for n, line in enumerate(lines) if n not in inside]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower()).replace("_", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in _prose_with_code(page):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _prose_with_code(page: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced blocks, inline code kept (headings keep their words)."""
    lines = page.read_text().splitlines()
    inside = set()
    for start, end, _ in _fences(lines):
        inside.update(range(start, end + 1))
    return [(n + 1, line) for n, line in enumerate(lines) if n not in inside]


def _markers() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for page in PAGES:
        for line in page.read_text().splitlines():
            m = MARKER.match(line)
            if m:
                assert m.group(1) not in found, f"readme-test block {m.group(1)!r} is defined twice"
                found[m.group(1)] = page
    return found


def _is_readme_commands(page: Path, lines: list[str], start: int) -> bool:
    """The README's two-commands block: tests/test_readme.py finds it by its `make serve` line and runs it."""
    return page == README and start + 1 < len(lines) and lines[start + 1].startswith("make serve")


def test_the_docs_pages_exist():
    missing = [name for name in REQUIRED_PAGES if not (DOCS / f"{name}.md").is_file()]
    assert not missing, f"docs pages missing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_bash_block_is_marked_for_a_test(page):
    lines = page.read_text().splitlines()
    problems = []
    for start, _, lang in _fences(lines):
        if lang in SHELL_LANGS:
            problems.append(f"line {start + 1}: a ```{lang} block: use ```bash with a readme-test marker, or ```text")
        if lang != "bash" or _is_readme_commands(page, lines, start):
            continue
        if start == 0 or not MARKER.match(lines[start - 1]):
            problems.append(f"line {start + 1}: a ```bash block without '<!-- readme-test: NAME -->' on the line "
                            "before it (mark it and run it in a test, or make it ```text)")
    for n, line in enumerate(lines):
        if MARKER.match(line) and (n + 1 >= len(lines) or lines[n + 1].strip() != "```bash"):
            problems.append(f"line {n + 1}: a readme-test marker not followed directly by a ```bash block")
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_readme_commands_block_is_there():
    text = README.read_text()
    block = re.search(r"```bash\n(make serve.*?)```", text, flags=re.S)
    assert block, "README.md lost its ```bash block that starts with `make serve`"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert "make serve" in commands and "make test" in commands
    assert "<!-- readme-test: stop -->" in text


def test_every_marked_block_is_run_by_a_test():
    sources = "\n".join(p.read_text() for p in sorted((ROOT / "tests").rglob("*.py"))
                        if p.resolve() != Path(__file__).resolve())
    unused = [f"{name} ({_rel(page)})" for name, page in _markers().items()
              if f'"{name}"' not in sources and f"'{name}'" not in sources]
    assert not unused, f"readme-test blocks that no test under tests/ runs: {unused}"


def test_the_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"

    def first(pattern: str) -> int:
        return next(n for n, line in enumerate(lines, 1) if re.search(pattern, line))

    # The front door: the two commands, a curl example and the own-model recipe come first.
    assert first(r"^make serve") < first(r"^curl ") < first(r"^## Serve your own model") <= 90
    assert first(r"^## Serve your own model") < first(r"^## KServe's own model server") < first(r"^## Layout")


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / target.split("#")[0]).resolve() for _, line in _prose(README)
              for target in LINK.findall(line) if target.startswith("docs/")}
    missing = [name for name in REQUIRED_PAGES if (DOCS / f"{name}.md").resolve() not in linked]
    assert not missing, f"README.md does not link docs pages: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for n, line in _prose(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"line {n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"line {n}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(page)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", [p for p in PAGES if p != LOG], ids=_rel)
def test_dated_notes_stay_in_the_log(page):
    """Only docs/log.md keeps dated history; elsewhere a date may only stand in a figure's caption (README's
    headline figures and docs/performance.md)."""
    captions_allowed = page in (README, PERFORMANCE)
    wrong = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if NOTEBOOK.search(line):
            wrong.append(f"line {n}: a notebook phrase ({NOTEBOOK.search(line).group(0)!r}): move it to docs/log.md")
        if DATE.search(line) and not (captions_allowed and CAPTION.match(line)):
            wrong.append(f"line {n}: a date outside a figure caption: {line.strip()[:100]}")
    assert not wrong, f"{_rel(page)}:\n" + "\n".join(wrong)


def test_every_performance_figure_has_its_machine_date_commit_and_command():
    sections = re.split(r"^(?=##+ )", PERFORMANCE.read_text(), flags=re.M)[1:]
    assert sections, "docs/performance.md has no sections"
    problems = []
    for section in sections:
        lines = section.splitlines()
        title = lines[0]
        captions = [n for n, line in enumerate(lines) if CAPTION.match(line)]
        if not captions:
            problems.append(f"{title}: no caption line ('Machine: ... · date: ... · commit: ... · command: `...`')")
            continue
        for n, line in enumerate(lines):
            starts_table = line.startswith("|") and (n == 0 or not lines[n - 1].startswith("|"))
            if starts_table and not any(c < n for c in captions):
                problems.append(f"{title}: a table before any caption: {line[:60]}")
    assert not problems, "\n".join(problems)


def test_the_readme_has_three_headline_figures_with_their_captions():
    section = README.read_text().split("## How fast", 1)[1].split("\n## ", 1)[0]
    captions = [line for line in section.splitlines() if CAPTION.match(line)]
    assert len(captions) >= 3, f"README's figures need a caption each (machine, date, commit, command): {captions}"
