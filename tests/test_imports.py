"""The import rules of ``.ci/imports.py`` hold for this tree, and the check catches each break."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "imports.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True, check=False)


def test_this_tree_follows_the_rules() -> None:
    done = _check(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in ("producer", "manager", "workers"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"manager/a.py": "from nosq.manager import b\n",
      "manager/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nosq.manager.a import A\n"},
     "import cycle: nosq.manager.a -> nosq.manager.b"),
    ({"manager/a.py": "def f():\n    from nosq.workers.w import g\n", "workers/w.py": "import torch\n"},
     ""),  # torch reached only inside a function: allowed
    ({"manager/a.py": "from nosq.workers import w\n", "workers/w.py": "import torch\n"},
     "nosq.manager.a imports torch at import time: nosq.manager.a -> nosq.workers.w -> torch"),
    ({"producer/p.py": "from nosq.manager import a\n", "manager/a.py": ""},
     "nosq.producer imports nosq.manager.a"),
    ({"workers/w.py": "def f():\n    from nosq.manager.a import x\n", "manager/a.py": ""},
     "nosq.workers imports nosq.manager.a"),
    ({"tests/t.py": "from producer import keys\n"},
     "tests/t.py:1: imports 'producer': write nosq.producer.keys"),
])
def test_the_check_catches(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    done = _check(_tree(tmp_path, files))
    if expected:
        assert done.returncode == 1 and expected in done.stdout, done.stdout + done.stderr
    else:
        assert done.returncode == 0, done.stdout + done.stderr
