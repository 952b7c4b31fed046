"""The import boundaries of the package: math knows nothing of files or the CLI, and the CLI
imports no torch at start-up (so `infl --help` stays fast)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "infl"
ALLOWED = {
    "curvature": {"torch"},
    "scoring": {"torch"},
    "capture": {"torch"},
    "gradients": {"torch", "infl.capture", "infl.curvature"},
    "store": {"zarr", "numpy", "infl", "infl.errors"},
    "console": {"rich"},
    "errors": set(),
    "config": {"infl.errors"},
    "cli": {"typer", "yaml", "rich", "infl.console", "infl.errors", "infl.config", "infl.report", "infl.stages", "infl.demo"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            names.add(node.module)
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_stay_inside_their_layer(module):
    used = imports_of(PKG / f"{module}.py")
    outside = {u for u in used if not any(u == a or u.startswith(a + ".") for a in ALLOWED[module])}
    assert not outside, f"infl.{module} imports {sorted(outside)}"


def test_stages_never_import_the_cli_or_each_other():
    for path in (PKG / "stages").glob("*.py"):
        used = imports_of(path)
        assert "infl.cli" not in used
        others = {u for u in used if u.startswith("infl.stages.")}
        assert not others, f"{path.name} imports {others}"


def test_cli_starts_without_torch():
    code = "import sys, infl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
