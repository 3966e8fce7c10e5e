"""Issue #9 item 1: the layers run one way, and import-linter enforces it (contracts in pyproject.toml).

The first test checks the real tree. The others prove that each contract bites: they copy the packages
into a temporary directory, add one deliberate wrong import there, and expect ``lint-imports`` to fail
naming the contract and the import. Deleting or loosening a contract therefore fails the suite. No
network: import-linter only reads source files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {
    "gateway-over-backends": "gateway sits on top of backends: no module under backends imports gateway",
    "backends-layers": "backends: registry, then the backends (independent of each other), then shared "
    "plumbing, then the contract",
    "no-torch-in-gateway": "the gateway and the backend contract never import torch, diffusers or transformers",
}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), "import-linter is a test dependency: pip install import-linter"
    # A wide terminal so that contract names are not wrapped; no cache directory left in the tree.
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [str(exe), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_every_contract() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in out.stdout
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for package in ("gateway", "backends"):
        shutil.copytree(ROOT / package, tmp_path / package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "statement", "contract", "reported"),
    [
        # The back-import issue #9 is about: a backend reaching up into the gateway.
        ("backends/imaging.py", "import gateway.config", "gateway-over-backends", "backends.imaging -> gateway.config"),
        # One backend importing another (what they share belongs in the plumbing).
        ("backends/cog.py", "import backends.replicate", "backends-layers", "backends.cog -> backends.replicate"),
        # The contract reaching up into the plumbing.
        ("backends/base.py", "import backends.http", "backends-layers", "backends.base -> backends.http"),
        # The plumbing reaching up into a backend.
        (
            "backends/imaging.py",
            "import backends.openai_compat",
            "backends-layers",
            "backends.imaging -> backends.openai_compat",
        ),
        # torch in the gateway, directly or through a module below it.
        ("gateway/cost.py", "import torch", "no-torch-in-gateway", "gateway.cost -> torch"),
        ("backends/settings.py", "import diffusers", "no-torch-in-gateway", "backends.settings -> diffusers"),
    ],
)
def test_a_deliberate_wrong_import_breaks_its_contract(
    copy: Path, module: str, statement: str, contract: str, reported: str
) -> None:
    path = copy / module
    path.write_text(
        path.read_text(encoding="utf-8") + f"\n{statement}  # deliberate, tests/test_layers.py\n", encoding="utf-8"
    )
    out = lint_imports(copy)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{CONTRACTS[contract]} BROKEN" in out.stdout
    assert reported in out.stdout
    broken = [name for name in CONTRACTS.values() if f"{name} BROKEN" in out.stdout]
    if contract != "gateway-over-backends":  # a back-import into gateway also reaches backends' layers
        assert broken == [CONTRACTS[contract]], out.stdout
