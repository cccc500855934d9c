"""The dependency DAG of DESIGN.md: features <- serving <- {stream, training} <- liftrec.

Checked on the source (every import statement, at any depth), so a lazy import
inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("features", "serving", "stream", "training", "liftrec")
ALLOWED = {
    "features": set(),
    "serving": {"features"},
    "stream": {"features", "serving"},
    "training": {"features", "serving"},
    "liftrec": {"features", "serving", "stream", "training"},
}
#: Third-party frameworks the shared core must not depend on.
FORBIDDEN_IN_FEATURES = {"faust", "fastapi", "starlette", "uvicorn", "implicit", "lightgbm", "onnxmltools", "torch"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_dag(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = []
    for f in files:
        for root in imported_roots(f) & set(PACKAGES):
            if root != package and root not in ALLOWED[package]:
                bad.append(f"{f.relative_to(ROOT)} imports {root}")
    assert not bad, "\n".join(bad)


def test_features_stays_framework_free() -> None:
    bad = [
        f"{f.relative_to(ROOT)} imports {root}"
        for f in sorted((ROOT / "features").rglob("*.py"))
        for root in imported_roots(f) & FORBIDDEN_IN_FEATURES
    ]
    assert not bad, "\n".join(bad)


def test_checker_sees_violations(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from stream.app import create_app\n    import training.als\n")
    assert imported_roots(f) == {"stream", "training"}
