"""The lab (mleps_lab, scripts/) uses the library through its public seams: no observer globals kept in the
library for it, no writes into the library's ConfigStore entries, no private imports, and no sys.path edits
(the dev install puts the checkout on the venv's path: Makefile)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO


def lab_files():
    return sorted([*(REPO / "mleps_lab").glob("*.py"), *(REPO / "scripts").glob("*.py")])


def test_the_lab_imports_no_private_names_and_writes_no_configstore_entry():
    for path in lab_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mleps."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr == "store":
                assert not (isinstance(node.value, ast.Call) and "ConfigStore" in ast.unparse(node.value)), path.name


def test_scripts_do_not_edit_sys_path_and_the_library_keeps_no_observer_list():
    for path in sorted((REPO / "scripts").glob("*.py")):
        assert "sys.path" not in path.read_text(encoding="utf-8"), f"{path.name} edits sys.path"
    import mleps.decoding

    assert not [name for name in vars(mleps.decoding) if "OBSERVER" in name.upper()]


def test_a_script_imports_the_lab_from_another_folder_without_pythonpath(tmp_path):
    """`make install` writes mleps-checkout.pth into the venv: python scripts/X.py finds mleps_lab."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "mgs_report.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout
