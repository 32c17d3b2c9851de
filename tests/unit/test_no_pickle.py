"""Nothing that ships may unpickle: no pickle-family imports, no torch.load, no allow_pickle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["schemas", "infra", "aggregator", "device_agent", "fedq", "bench"]
BANNED_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "joblib",
    "cloudpickle",
    "shelve",
    "marshal",
}


def _shipped_files() -> list[Path]:
    files = [p for package in SHIPPED for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 20, "the scan must see the real source tree"
    return files


def _violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                found.append(node.module)
        elif _is_torch_load(node):
            found.append("torch.load")
        elif _is_allow_pickle(node):
            found.append("allow_pickle=True")
    return found


def _is_torch_load(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "load"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    )


def _is_allow_pickle(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.keyword)
        and node.arg == "allow_pickle"
        and isinstance(node.value, ast.Constant)
        and node.value.value is True
    )


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from joblib import load",
        "import torch\ntorch.load('x')",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import dill.settings",
    ],
)
def test_scanner_catches_each_banned_form(source: str) -> None:
    # Arrange / act / assert: the scanner itself must be able to fail.
    assert _violations(source)


def test_no_shipped_module_can_unpickle() -> None:
    # Arrange
    offenders = {}
    # Act
    for path in _shipped_files():
        hits = _violations(path.read_text())
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    # Assert
    assert offenders == {}
