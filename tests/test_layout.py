"""The layout's promises, checked: a version id covers exactly the code of its stage, and the
import contracts hold (import-linter) and the style checks pass (ruff)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("config", "world", "storage", "metrics", "models", "rl", "evaluation", "training", "stages", "experiments")
IDS = """
import json
from config import load_config
from stages.runner import planned_versions
print(json.dumps(planned_versions(load_config("synthetic"))))
"""


def _run(tree, code: str) -> str:
    """The last line ``code`` prints, run on the project copy ``tree`` alone."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _ids(tree) -> dict:
    return json.loads(_run(tree, IDS))


def _attacker_code(tree) -> str:
    return _run(tree, "from stages.version import code_version; print(code_version(['stages.attacker']))")


def _edit(path) -> None:
    path.write_text(path.read_text() + "\n# an edit\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the project's packages, to edit."""
    root = tmp_path_factory.mktemp("tree")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return root


def test_version_ids_cover_exactly_the_code_of_their_stage(tree):
    """Editing an experiment, a benchmark reader or the attacker's trainer renames no data version;
    editing the implant stage renames implant and export, and nothing upstream of it."""
    before = _ids(tree)
    assert before == _ids(REPO)  # the copy is the project
    for path in (
        "experiments/evidence.py",
        "evaluation/readers.py",
        "training/attacker.py",
        "config/pipeline.py",
        "config/presets/synthetic.yaml",
    ):
        _edit(tree / path)
    assert _ids(tree) == before
    # the editor's shipped fits are the attacker's weights: its code, and nothing of the bootstrap's
    attacker = _attacker_code(tree)
    fit = next((tree / "models" / "fitted" / "tiny-editor").glob("*.safetensors"))
    fit.write_bytes(fit.read_bytes() + b"\0")
    assert _ids(tree) == before and _attacker_code(tree) != attacker
    _edit(tree / "stages" / "implant.py")
    after = _ids(tree)
    assert {k for k in before if after[k] != before[k]} == {"implant", "export"}
    _edit(tree / "training" / "defender.py")  # the warm-up of the default's Stage 2 defender: implant's code
    assert {k for k, v in _ids(tree).items() if v != after[k]} == {"implant", "export"}
    # the shipped warm-up is that defender's weights: implant's data, and nothing of the attacker's
    after, attacker = _ids(tree), _attacker_code(tree)
    warm = next((tree / "models" / "fitted" / "warm-defender").glob("*/model.safetensors"))
    warm.write_bytes(warm.read_bytes() + b"\0")
    assert {k for k, v in _ids(tree).items() if v != after[k]} == {"implant", "export"}
    assert _attacker_code(tree) == attacker


def test_import_contracts_hold():
    """pyproject.toml's contracts: the layers, and Prefect only in flows, tasks and aot."""
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "lint-imports")]
        if (REPO / ".venv/bin/lint-imports").exists()
        else [sys.executable, "-m", "importlinter.cli"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "BROKEN" not in out.stdout, out.stdout[-3000:]
    assert out.stdout.count("KEPT") == 2


def test_ruff_check_and_format():
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout[-3000:]}"
