"""dvc.yaml declares every project module a stage's command runs, so `dvc repro` is never stale.

For each stage, the command's function is found in the Typer app; its module, the imports
in its body and, transitively, every import of every project module reached (anywhere in
the file: a lazy import inside a function runs too) must be covered by the stage's deps
(a file, or a folder above it). Imports are read with ``ast``, not executed.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

from evocomp.cli import app

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("evocomp", "flows")
# Modules every command imports that cannot change what a stage writes.
EXEMPT = {
    "evocomp/__init__.py": "the version string",
    "evocomp/cli/__init__.py": "registers every command; argv picks the one that runs",
}


def command_function(cmd: str):
    """The Python function behind ``evocomp <group> <command> ...``."""
    argv = shlex.split(cmd)[1:]
    if argv[:1] == ["--profile"]:  # the root option's value is not a command
        argv = argv[2:]
    words = [w for w in argv if not w.startswith("-")]
    typer_app = app
    while True:
        name = words.pop(0)
        group = next((g for g in typer_app.registered_groups if g.name == name), None)
        if group is None:
            break
        typer_app = group.typer_instance
    for info in typer_app.registered_commands:
        if (info.name or info.callback.__name__.replace("_", "-")) == name:
            return info.callback
    raise AssertionError(f"no command {name!r} in `{cmd}`")


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Project modules an AST imports (``from pkg import mod`` counts ``pkg.mod``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PROJECT and _file(n)}
    return out


def _file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def code_of(cmd: str) -> set[str]:
    """Repository paths of every project module the command runs."""
    fn = command_function(cmd)
    module = inspect.getmodule(fn).__name__
    source = Path(inspect.getsourcefile(fn))
    tree = ast.parse(source.read_text())
    top = ast.Module(
        body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[]
    )
    todo = imported_modules(top, module) | imported_modules(
        ast.parse(textwrap.dedent(inspect.getsource(fn))), module
    )
    files, seen = {source}, set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # parent packages run first
        path = _file(name)
        if str(path.resolve().relative_to(REPO)) in EXEMPT:
            continue  # neither a dep nor walked
        files.add(path)
        pkg = name if path.name == "__init__.py" else ".".join(parts[:-1])
        todo |= imported_modules(ast.parse(path.read_text()), pkg)
    return {str(f.resolve().relative_to(REPO)) for f in files}


def uncovered(code: set[str], deps: list[str]) -> set[str]:
    dirs = [d.rstrip("/") + "/" for d in deps]
    return {f for f in code if f not in deps and not any(f.startswith(d) for d in dirs)}


def stages() -> dict[str, dict]:
    """Each stage's definition; a ``foreach`` stage's ``do`` (``${item}`` left unexpanded)."""
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_a_dep(name):
    stage = stages()[name]
    missing = uncovered(code_of(stage["cmd"]), stage.get("deps", []))
    assert not missing, f"dvc.yaml stage {name!r} runs {sorted(missing)} but does not list them"


def test_the_check_fails_on_a_missing_dep():
    """A planted omission is caught: drop each code dep of the label stage in turn."""
    stage = stages()["label"]
    code = code_of(stage["cmd"])
    code_deps = [d for d in stage["deps"] if d.startswith(PROJECT)]
    assert code_deps
    for dep in code_deps:
        assert uncovered(code, [d for d in stage["deps"] if d != dep]), dep


def test_the_walk_follows_lazy_and_transitive_imports():
    code = code_of("evocomp label --out x")
    # flows/label.py is imported inside the command; the search, two hops further
    assert {"flows/label.py", "evocomp/labeling/run.py", "evocomp/search/ga.py"} <= code
    assert "evocomp/mllm/reference.py" not in code  # not everything: only what label runs
