"""No step module imports another step module: what two steps share lives in a shared module
under pipelines/steps/ whose name starts with `_` (not a step), or in owl/."""

from __future__ import annotations

import ast
from pathlib import Path

from pipelines.dag import STEPS

STEPS_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "steps"
PACKAGE = "pipelines.steps"


def step_modules() -> set[str]:
    """Every module of the step table, and every module under pipelines/steps/ not named `_*`."""
    files = {f"{PACKAGE}.{p.stem}" for p in STEPS_DIR.glob("*.py") if not p.stem.startswith("_")}
    return files | {spec.module for spec in STEPS.values()}


def imported_modules(source: str) -> set[str]:
    """Modules a source imports anywhere (function bodies included), `from pkg import name`
    counted as both `pkg` and `pkg.name` (name may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: only pipelines/steps/ has them here
                base = ".".join([PACKAGE, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_import_finder_sees_every_form() -> None:
    source = (
        "import pipelines.steps.download as d\n"
        "def f():\n    from pipelines.steps import filter\n"
        "from .tokenize_captions import run\n"
    )
    found = imported_modules(source)
    assert {
        "pipelines.steps.download",
        "pipelines.steps.filter",
        "pipelines.steps.tokenize_captions",
    } <= found


def test_step_table_modules_live_under_steps() -> None:
    for spec in STEPS.values():
        assert (
            spec.module.startswith(f"{PACKAGE}.")
            and (STEPS_DIR / f"{spec.module.split('.')[-1]}.py").is_file()
        )


def test_no_step_module_imports_another() -> None:
    steps = step_modules()
    offences = []
    for path in sorted(STEPS_DIR.glob("*.py")):
        name = f"{PACKAGE}.{path.stem}"
        for imported in sorted(imported_modules(path.read_text()) & (steps - {name})):
            offences.append(f"{path.name} imports {imported}")
    assert not offences, "move the shared code into a `_*.py` module: " + "; ".join(offences)
