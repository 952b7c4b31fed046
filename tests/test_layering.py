"""The import boundaries of the package: math knows nothing of files or the CLI, only the artifact
modules touch Zarr, only the driver touches torch.distributed, and the CLI imports no torch at
start-up (so `infl --help` stays fast)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "infl"
CURVATURE = {"torch", "infl.curvature"}
ARTIFACTS = {"zarr", "numpy", "infl.__version__", "infl.errors", "infl.hashing", "infl.outputs", "infl.artifacts"}
ALLOWED = {
    "curvature/__init__": {"infl.errors"},  # the registry: no torch
    **{f"curvature/{p.stem}": CURVATURE for p in (PKG / "curvature").glob("*.py") if p.stem != "__init__"},
    "scoring": {"torch"},
    "lexical": {"numpy", "scipy"},  # BM25 over token ids: no files, no torch
    "indexing": {"torch", "infl.curvature.base"},  # bases dense or blocked
    "capture": {"torch"},
    "gradients": {"torch", "infl.capture", "infl.curvature"},
    **{f"artifacts/{p.stem}": ARTIFACTS for p in (PKG / "artifacts").glob("*.py")},
    "driver": {"torch", "infl.errors"},
    "planning": {
        "torch",
        "transformers",
        "infl.gradients",
        "infl.curvature",
        "infl.scoring",
        "infl.errors",
    },  # shapes, no files
    "runtime": {"torch", "infl.modeling", "infl.capture"},
    **{
        f"analysis/{p.stem}": {"numpy", "infl.artifacts", "infl.errors", "infl.analysis"}
        for p in (PKG / "analysis").glob("*.py")
    },
    "analysis/sparsity": {"numpy", "powerlaw"},  # maximum-likelihood fits, no files
    "analysis/compare": {"numpy", "scipy", "infl.artifacts", "infl.errors", "infl.analysis"},  # Spearman's rho
    "report/__init__": {"rich", "numpy", "infl.analysis", "infl.outputs"},
    "report/figures": {"numpy", "matplotlib", "infl.report", "infl.outputs"},
    "report/page": {"jinja2", "markupsafe", "infl.report", "infl.outputs"},
    "console": {"rich", "infl.outputs"},  # printable: the one escaping of text from data
    "errors": set(),
    "outputs": {"infl.errors"},  # the rule of every file written beside artifacts, and of printed text
    "hashing": set(),
    "noop": {"infl.hashing"},  # up to date before torch, zarr or transformers load
    "api": {"numpy", "infl.artifacts", "infl.errors", "infl.analysis", "infl.config", "infl.report", "infl.stages"},
    "config": {"infl.errors", "infl.curvature"},
    "corpora": {"pyarrow", "zstandard", "infl.errors", "infl.hashing"},  # formats: no torch, no tokenizer
    "cli": {
        "typer",
        "yaml",
        "rich",
        "infl.__version__",
        "infl.noop",
        "infl.hashing",
        "infl.console",
        "infl.errors",
        "infl.config",
        "infl.report",
        "infl.stages",
        "infl.demo",
        "infl.outputs",
    },
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            names |= {f"infl.{a.name}" for a in node.names} if node.module == "infl" else {node.module}
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_stay_inside_their_layer(module):
    used = imports_of(PKG / f"{module}.py")
    outside = {u for u in used if not any(u == a or u.startswith(a + ".") for a in ALLOWED[module])}
    assert not outside, f"infl.{module} imports {sorted(outside)}"


def test_only_artifacts_touch_zarr_and_only_the_driver_touches_torch_distributed():
    for path in PKG.rglob("*.py"):
        used = imports_of(path)
        where = path.relative_to(PKG).as_posix()
        if any(u.split(".")[0] == "zarr" for u in used):
            assert where.startswith("artifacts/"), f"{where} imports zarr"
        if any(u.startswith("torch.distributed") for u in used):
            assert where == "driver.py", f"{where} imports torch.distributed"


def test_stages_never_import_the_cli_or_each_other_and_stay_short():
    for path in (PKG / "stages").glob("*.py"):
        used = imports_of(path)
        assert "infl.cli" not in used
        others = {u for u in used if u.startswith("infl.stages.")}
        assert not others, f"{path.name} imports {others}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):  # statements, not lines: the formatter decides those
                length = sum(isinstance(inner, ast.stmt) for inner in ast.walk(node)) - 1
                assert length <= 50, f"{path.name}: {node.name} has {length} statements"


def test_cli_starts_without_torch():
    code = "import sys, infl.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
