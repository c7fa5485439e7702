"""Every ```python block of README.md and doc/guide/*.md runs as written.

Each page's blocks run in order, in one fresh namespace per page, in a temporary working
directory (files a snippet writes, such as caches, land there), with torch and BLAS
pinned to one thread and every warning turned into an error.

A block can say, in an HTML comment on the line(s) just before its fence (invisible in
the rendered page):

* ``<!-- not-runnable: REASON -->``: never run (for example, it needs a GPU or a
  cluster); the test of that block is reported as skipped with the reason;
* ``<!-- slow: REASON -->``: too heavy for the default run; it and the page's later
  blocks run under ``pytest -m slow``, the earlier ones in the default run too;
* ``<!-- warns: CATEGORY: REASON -->``: the block is expected to raise the warning
  ``CATEGORY`` (a class name, e.g. ``ConvergenceWarning``) and must raise it.
"""

import contextlib
import io
import re
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "doc" / "guide").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(not-runnable|slow|warns)\s*:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
# Warnings that are not the documentation's to explain, with the reason.
IGNORED = [
    # torch's forward-mode AD scripts its jvp decompositions on first use (not our code;
    # pytest.ini ignores it for the same reason).
    (r"`torch.jit.script` is deprecated", DeprecationWarning),
]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    marks: dict = field(default_factory=dict)

    @property
    def name(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page):
    """The ```python blocks of ``page``, with the markers just above each fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, k = [], 0
    while k < len(lines):
        opening = FENCE.match(lines[k])
        if not opening:
            k += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"]
        body, end = [], k + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if (closing and closing["fence"][0] == fence[0]
                    and len(closing["fence"]) >= len(fence) and not closing["info"]):
                break
            body.append(lines[end][len(indent):] if lines[end].startswith(indent)
                        else lines[end].lstrip())
            end += 1
        if info == "python":
            marks, above = {}, k - 1
            while above >= 0 and (not lines[above].strip()
                                  or MARKER.match(lines[above].strip())):
                found = MARKER.match(lines[above].strip())
                if found:
                    marks.setdefault(found[1], []).append(found[2])
                above -= 1
            blocks.append(Block(page, k + 1, "\n".join(body) + "\n", marks))
        k = end + 1
    return blocks


BLOCKS = {page: parse(page) for page in PAGES}
RUNNABLE = {page: [b for b in blocks if "not-runnable" not in b.marks]
            for page, blocks in BLOCKS.items()}
NOT_RUNNABLE = [b for blocks in BLOCKS.values() for b in blocks if "not-runnable" in b.marks]


def _split_at_slow(blocks):
    """``(default, slow)``: the blocks before the first slow one, and the rest."""
    for k, block in enumerate(blocks):
        if "slow" in block.marks:
            return blocks[:k], blocks[k:]
    return blocks, []


def _expected_categories(block):
    """The warning classes a block's ``warns`` markers name (built-in, sklearn's or
    skmsif's)."""
    import builtins

    import sklearn.exceptions

    import skmsif

    categories = []
    for entry in block.marks.get("warns", []):
        name = entry.split(":", 1)[0].strip()
        found = [getattr(module, name) for module in (builtins, sklearn.exceptions, skmsif)
                 if isinstance(getattr(module, name, None), type)
                 and issubclass(getattr(module, name), Warning)]
        assert found, f"{block.name}: unknown warning category {name!r}"
        categories.append(found[0])
    return categories


def _run(blocks, monkeypatch, tmp_path):
    """Execute ``blocks`` in order in one namespace; return what they printed."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_snippet__"}
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            for block in blocks:
                expected = _expected_categories(block)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("error")
                    for message, category in IGNORED:
                        warnings.filterwarnings("ignore", message=message, category=category)
                    for category in expected:
                        warnings.filterwarnings("always", category=category)
                    code = compile(block.code, block.name, "exec")
                    try:
                        with contextlib.redirect_stdout(printed):
                            exec(code, namespace)
                    except Exception:
                        pytest.fail(f"{block.name} failed:\n{traceback.format_exc()}\n"
                                    f"It printed:\n{printed.getvalue()[-3000:]}",
                                    pytrace=False)
                for category in expected:
                    assert any(issubclass(w.category, category) for w in caught), (
                        f"{block.name} says it warns with {category.__name__}, and did not")
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def _page_id(page):
    return str(page.relative_to(ROOT))


def test_the_pages_have_code_to_run():
    assert RUNNABLE[ROOT / "README.md"], "README.md has no runnable ```python block"
    assert sum(len(blocks) for blocks in RUNNABLE.values()) >= 8


def test_every_marker_gives_a_reason():
    for blocks in BLOCKS.values():
        for block in blocks:
            for kind, reasons in block.marks.items():
                assert all(reason for reason in reasons), f"{block.name}: {kind} needs a reason"


@pytest.mark.parametrize("page", [p for p in PAGES if _split_at_slow(RUNNABLE[p])[0]],
                         ids=_page_id)
def test_page_snippets_run(page, monkeypatch, tmp_path):
    """The page's blocks up to its first slow one run, in order, without a warning."""
    default, later = _split_at_slow(RUNNABLE[page])
    printed = _run(default, monkeypatch, tmp_path)
    print(printed)
    if later:
        print(f"{len(later)} block(s) from {later[0].name} on run under -m slow: "
              f"{later[0].marks['slow'][0]}")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _split_at_slow(RUNNABLE[p])[1]],
                         ids=_page_id)
def test_page_snippets_run_slow(page, monkeypatch, tmp_path):
    """Pages with slow blocks: every runnable block, in order."""
    print(_run(RUNNABLE[page], monkeypatch, tmp_path))


@pytest.mark.parametrize("block", NOT_RUNNABLE, ids=lambda block: block.name)
def test_not_runnable_blocks_are_reported(block):
    pytest.skip(f"not runnable: {block.marks['not-runnable'][0]}")


def test_pages_outside_the_guide_show_only_code_that_runs_here():
    """doc/index.rst and doc/install.md show the README's code by inclusion, never a copy
    that could drift from what this test runs: no python or bash block of their own."""
    pages = sorted((ROOT / "doc").glob("*.rst")) + sorted((ROOT / "doc").glob("*.md"))
    assert pages
    own = re.compile(r"^\s*(\.\. code-block::|\.\. code::|```+\s*(python|bash|sh)\b)")
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not own.match(line), (
                f"{page.relative_to(ROOT)}:{number} has a code block of its own; include "
                "the README's (literalinclude) so that the tested code is what is shown")
    index = (ROOT / "doc" / "index.rst").read_text(encoding="utf-8")
    assert ".. literalinclude:: ../README.md" in index and ":start-after: ```python" in index
    # The block that start-after finds first is the one README's test runs.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = readme.split("```python", 1)[1].split("```", 1)[0]
    assert RUNNABLE[ROOT / "README.md"][0].code.strip() == first.strip()
