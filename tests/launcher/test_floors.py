"""The packages' floors look down only: launcher -> router -> shards -> layers. Each floor's
entry modules, imported in a fresh interpreter, bring in nothing from a floor above them; and
import-linter's contracts (pyproject.toml), which read every import statement, hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABOVE = {
    "router": ("launcher",),
    "shards": ("launcher", "router"),
    "layers": ("launcher", "router", "shards"),
}
ENTRIES = {
    "router.http.server": "router",
    "router.http.routes": "router",
    "router.engine.async_engine": "router",
    "shards.server": "shards",
    "shards.loader": "shards",
    "shards.worker": "shards",
    "layers.linear": "layers",
    "layers.attention.torch_sdpa": "layers",
}


def _imported(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", sorted(ENTRIES))
def test_a_floor_imports_nothing_above_it(module):
    above = ABOVE[ENTRIES[module]]
    climbing = [m for m in _imported(module) if m.split(".")[0] in above]
    assert not climbing, f"{module} imports {climbing}"


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout
