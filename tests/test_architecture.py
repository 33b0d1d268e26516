"""The package's floors, checked on its source: imports only go down.

kernels (``gradproj.kernels``, ``gradproj._C``) < the library (``gradproj.*``,
``gradproj.integrations``) < the seed methods (``gradproj.methods``) < the lab
(``gradproj.lab``; the benchmarks, ``gradproj.bench``, beside it) < the command
line (``gradproj.cli``, ``gradproj.__main__``).
Every import is read from the syntax tree, the ones inside functions included, so
a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gradproj

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("kernels", "library", "methods", "lab", "command line")


def _modules() -> dict[str, Path]:
    """Dotted name -> source file, for the package and the kernels installed inside it."""
    out = {}
    for path in sorted((ROOT / "gradproj").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "gradproj.kernels" if path.stem == "__init__" else f"gradproj.kernels.{path.stem}"
        out[name] = path
    return out


MODULES = _modules()


def floor(module: str) -> int:
    if module.startswith(("gradproj.kernels", "gradproj._C")):
        return 0
    if module in ("gradproj.cli", "gradproj.__main__"):
        return 4
    if module.startswith(("gradproj.lab", "gradproj.bench")):
        return 3
    if module.startswith("gradproj.methods"):
        return 2
    return 1


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a gradproj module in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # `from gradproj import ops` imports a module; `from gradproj import
                # ConceptSubspace` imports a name of the package itself.
                found.append((full if full in MODULES else base, node.lineno))
    return [(m, line) for m, line in found if m == "gradproj" or m.startswith("gradproj.")]


def test_the_scan_sees_every_floor():
    floors = {floor(m) for m in MODULES}
    assert floors == {0, 1, 2, 3, 4}, floors
    assert len(MODULES) > 30
    # and resolves imports: the lab's demo imports a method and the library
    demo = {m for m, _ in _imports("gradproj.lab.demo", MODULES["gradproj.lab.demo"])}
    assert "gradproj.lab.measure" in demo and "gradproj.subspace" in demo


def test_imports_only_go_down():
    upward = []
    for name, path in MODULES.items():
        for target, line in _imports(name, path):
            if floor(target) > floor(name):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} ({FLOORS[floor(name)]}) imports "
                    f"{target} ({FLOORS[floor(target)]})"
                )
    assert not upward, "imports going up a floor:\n" + "\n".join(upward)


def test_a_violation_is_caught(tmp_path):
    """The check is not vacuous: a library module importing the lab is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from gradproj.lab import demo\n")
    (target, line), *_ = _imports("gradproj.bad", bad)
    assert (target, line) == ("gradproj.lab.demo", 2)
    assert floor(target) > floor("gradproj.bad")


def test_every_public_name_resolves_from_import_gradproj():
    for name in gradproj.__all__:
        assert getattr(gradproj, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        gradproj.nonexistent  # noqa: B018


def test_import_gradproj_stays_light():
    """The seed methods and the lab (and diffusers with them) load on first use only."""
    code = (
        "import sys, gradproj\n"
        "heavy = [m for m in sys.modules if m.startswith(('gradproj.methods', 'gradproj.lab',"
        " 'diffusers'))]\n"
        "assert not heavy, heavy\n"
        "gradproj.AntiMemorizationGuidance\n"
        "assert 'gradproj.methods.guidance' in sys.modules\n"
        "assert not [m for m in sys.modules if m.startswith('gradproj.lab')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
