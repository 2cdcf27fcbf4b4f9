"""Every Python code block in README.md, CONTRIBUTING.md and docs/*.md runs as written on this machine.

The blocks of one file run in order in one namespace, like a notebook, so a later block may use what an earlier one
defined. A block whose fence reads ```` ```python torchrun=N ```` runs alone under ``torchrun --nproc-per-node N``
(gloo on the CPU). Snippets pick their device themselves (``"cuda" if torch.cuda.is_available() else "cpu"``), so the
same text runs here and on a GPU machine. CONTRIBUTING.md's blocks run with the clone's root on the path, as a
contributor runs them there (they use ``tests.helpers``). Blocks in other languages (bash) are not run here: the
commands they show are the scripts that CI runs.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Files whose snippets import from the clone itself (``tests.helpers``), not only the installed package.
FROM_CLONE = {"CONTRIBUTING.md"}
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """``(line, info, code)`` of each ```` ```python ```` block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group("info").strip(), m.group("code"))
            for m in FENCE.finditer(text)]


DOC_FILES = [p for p in DOCS if python_blocks(p)]


def test_every_doc_with_code_is_collected():
    # A renamed fence (```py, ```Python) would silently drop a block from this test.
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"^```(py|Python|python3)\s*$", text, re.MULTILINE), f"{path.name}: use ```python"
    assert ROOT / "README.md" in DOC_FILES and ROOT / "CONTRIBUTING.md" in DOC_FILES


@pytest.mark.slow
@pytest.mark.no_poison  # the snippets run library code as a user would, on real memory
@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_doc_python_blocks_run(path, tmp_path):
    """Runs the file's blocks in a fresh interpreter (a snippet may set global state: threads, default dtype)."""
    plain, distributed = [], []
    for line, info, code in python_blocks(path):
        (distributed if info.startswith("torchrun=") else plain).append((line, info, code))
    if plain:
        script = tmp_path / "blocks.py"
        # Each block is compiled with its own line numbers, so a traceback points into the Markdown file.
        lines = ["import sys", "_ns = {'__name__': '__main__'}"]
        for line, _, code in plain:
            lines.append(f"exec(compile({code!r}, {f'{path.name}:{line}'!r}, 'exec'), _ns)")
        script.write_text("\n".join(lines) + "\n")
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=_env(path))
        assert run.returncode == 0, f"{path.name}: a block failed\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    for line, info, code in distributed:
        nproc = int(info.split("=", 1)[1])
        script = tmp_path / f"block_{line}.py"
        script.write_text(code)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", str(script)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=_env(path))
        assert run.returncode == 0, (f"{path.name}:{line}: the torchrun block failed\n{run.stdout[-4000:]}\n"
                                     f"{run.stderr[-6000:]}")


def _env(path: pathlib.Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    paths = [str(ROOT / "src"), *([str(ROOT)] if path.name in FROM_CLONE else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"  # a snippet that reaches for the hub fails here rather than hanging
    return env
