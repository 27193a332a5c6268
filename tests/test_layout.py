"""The layout holds: each stage's package imports only the stages before it (improve -> extract -> train ->
data_prep -> common), and no module imports an entry script."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What each package may import from the project, besides itself.
ALLOWED = {
    "common": set(),
    "configs": set(),
    "data_prep": {"common"},
    "train": {"common", "data_prep"},
    "extract": {"common", "data_prep", "train"},
    "improve": {"common", "configs", "data_prep", "train", "extract"},
    "launch": set(),
}
ENTRY_SCRIPTS = {"train.main", "data_prep.__main__", "extract.__main__", "improve.__main__"}


def project_imports(path: Path) -> set[str]:
    """The dotted names of the project modules a file imports (absolute imports only: we use no others)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in ALLOWED}


def test_imports_run_one_way_and_never_into_an_entry_script():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(project_imports(path)):
                top = name.split(".")[0]
                if top != package and top not in allowed:
                    violations.append(f"{path.relative_to(ROOT)} imports {name} ({package} may import {allowed})")
                if name in ENTRY_SCRIPTS:
                    violations.append(f"{path.relative_to(ROOT)} imports the entry script {name}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_a_backward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from extract.database import open_database\nimport train.main\n")
    assert project_imports(module) == {"extract.database", "extract.database.open_database", "train.main"}
