"""The house rules of the code's layout, read from the source (docs/DEVELOPING.md, "Rules"):
the library imports neither Lightning, Hydra nor the shells; no module reaches into another
package's private names; the scripts import the installed package, never through ``sys.path``;
every cross-reference in a docstring names a module or name that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "saferclip"
# saferclip/ minus these is the library; the shells may import Lightning and Hydra
SHELLS = ("app", "benchmarks")
FRAMEWORKS = ("lightning", "hydra")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, imported names, line)`` of every import in ``path``, in functions too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ""  # a script's relative import would be an error anyway
    if path.is_relative_to(PACKAGE):
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def library_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in SHELLS]


def test_the_import_reader_resolves_relative_imports():
    here = PACKAGE / "robustness" / "runner.py"
    found = {module for module, _, _ in imports(here)}
    assert {"saferclip.analysis.detector", "saferclip.robustness.coverage", "torch"} <= found
    init = {module for module, _, _ in imports(PACKAGE / "redirection" / "__init__.py")}
    assert "saferclip.redirection.cache" in init


def test_the_library_imports_neither_lightning_hydra_nor_the_shells():
    shells = tuple(f"saferclip.{s}" for s in SHELLS)
    bad = []
    for path in library_modules():
        for module, _, line in imports(path):
            top = module.split(".")[0]
            if top in FRAMEWORKS or module.startswith(shells):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert library_modules() and not bad, bad


def private_reach_ins(paths: list[Path]) -> list[str]:
    """Imports of a private name (``_x``, not ``__x__``) of another saferclip package."""
    bad = []
    for path in paths:
        own = module_name(path).split(".")[:2] if path.is_relative_to(PACKAGE) else ["scripts"]
        for module, names, line in imports(path):
            parts = module.split(".")
            if parts[0] != "saferclip" or parts[:2] == own:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.name}:{line} takes {', '.join(private)} from {module}")
    return bad


def test_no_module_takes_another_packages_private_names():
    """analysis/ and robustness/ (and every other pair of packages, and the scripts) meet
    through public names only; a private name is its own package's business."""
    paths = [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]
    assert not private_reach_ins(paths), private_reach_ins(paths)


def test_the_reach_in_finder_sees_one(tmp_path):
    """A file outside saferclip/ counts as a script: the private name is found; a name taken
    from a private module (``_openclip``, the one place open_clip is imported) is not."""
    script = tmp_path / "probe.py"
    script.write_text(
        "from saferclip.toyworld.scene import _make_tiles\nfrom saferclip.model._openclip import open_clip\n"
    )
    assert private_reach_ins([script]) == ["probe.py:1 takes _make_tiles from saferclip.toyworld.scene"]


def test_scripts_import_the_package_without_touching_sys_path():
    """Every script runs as ``python scripts/x.py`` against the installed package; what two
    scripts share lives in ``saferclip/benchmarks/``, so no script imports another."""
    scripts = sorted((REPO / "scripts").glob("*.py"))
    names = {p.stem for p in scripts}
    bad = []
    for path in scripts:
        if "sys.path" in path.read_text():
            bad.append(f"{path.name} touches sys.path")
        bad += [
            f"{path.name}:{line} imports the script {m}" for m, _, line in imports(path) if m.split(".")[0] in names
        ]
    assert scripts and not bad, bad


# ---------------------------------------------------------------- docstrings' cross-references

REFERENCE = re.compile(r":(mod|func|class|data|attr|meth|exc):`~?([\w.]+)`")


def module_file(dotted: str) -> Path | None:
    """The file of module ``dotted`` (a package's ``__init__.py``; ``saferclip/app/`` is a
    namespace package: its folder), None when there is no such module."""
    path = REPO.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path if path.is_dir() and path.is_relative_to(PACKAGE) else None


def top_level_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level (an ``if`` block's imports too)."""
    names: set[str] = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            nodes += node.body
    return names


def broken_references(path: Path, package: str) -> list[str]:
    """The Sphinx-style references in ``path``, a module of ``package`` (``:mod:`.sibling```,
    ``:func:`saferclip.x.y.f```), that name no module, or no top-level name of their module."""
    bad = []
    for kind, ref in REFERENCE.findall(path.read_text()):
        if ref.startswith("."):
            if kind != "mod":
                continue  # a relative function reference is to the module's own names
            dotted = package + ref
        elif ref.split(".")[0] == "saferclip":
            dotted = ref
        else:
            continue  # another library's, or a name of this module
        if kind == "mod":
            ok = module_file(dotted) is not None
        else:
            parts, ok = dotted.split("."), False
            for cut in range(len(parts) - 1, 0, -1):
                found = module_file(".".join(parts[:cut]))
                if found is not None:
                    ok = found.is_file() and parts[cut] in top_level_names(found)
                    break
        if not ok:
            bad.append(f"{path.name}: :{kind}:`{ref}`")
    return bad


def test_every_docstring_reference_names_something_that_exists():
    """A module moved, renamed or removed leaves no docstring pointing at its old place (the
    package docstrings are the map of each package)."""
    modules = sorted(PACKAGE.rglob("*.py"))
    bad = [b for path in modules for b in broken_references(path, module_name(path.parent))]
    assert len(modules) > 100 and not bad, bad


def test_the_reference_checker_sees_a_stale_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        '""":mod:`.coverage`, :mod:`.no_such_module`, :func:`saferclip.toyworld.scene.make_tiles`,\n'
        ':func:`saferclip.toyworld.scene.no_such_function`, :func:`saferclip.models.build_clip`, :class:`torch.Tensor`"""\n'
    )
    assert broken_references(probe, "saferclip.robustness") == [
        "probe.py: :mod:`.no_such_module`",
        "probe.py: :func:`saferclip.toyworld.scene.no_such_function`",
        "probe.py: :func:`saferclip.models.build_clip`",
    ]


# ---------------------------------------------------------------- the shell's three rooms

COMMANDS = PACKAGE / "app" / "commands"


def command_cross_imports(paths: list[Path]) -> list[str]:
    """Imports of one command module (``saferclip.app.commands.<x>``) by another: what two
    commands share belongs in the engine, the pipelines or the shared plumbing."""
    bad = []
    for path in paths:
        for module, names, line in imports(path):
            targets = [module] if module != "saferclip.app.commands" else [f"{module}.{n}" for n in names]
            bad += [
                f"{path.name}:{line} imports {t}"
                for t in targets
                if t.startswith("saferclip.app.commands.") and t != module_name(path)
            ]
    return bad


def test_no_command_imports_another_command():
    commands = sorted(COMMANDS.glob("*.py"))
    assert len(commands) > 10 and not command_cross_imports(commands), command_cross_imports(commands)


def test_the_cross_import_finder_sees_one(tmp_path):
    """Both spellings are found; a command importing the engine or a pipeline is fine."""
    probe = COMMANDS / "probe_cross_import.py"  # inside the package, so its relative imports resolve
    probe.write_text(
        "from .analyze import run\nfrom . import evaluate\nfrom ..pipelines.runs import compose\nfrom ..engine.fit import train\n"
    )
    try:
        assert command_cross_imports([probe]) == [
            "probe_cross_import.py:1 imports saferclip.app.commands.analyze",
            "probe_cross_import.py:2 imports saferclip.app.commands.evaluate",
        ]
    finally:
        probe.unlink()


def test_the_engine_and_the_pipelines_import_no_command():
    """The rooms stack: commands over pipelines over the engine, never back up."""
    rooms = {"engine": ("saferclip.app.commands", "saferclip.app.pipelines"), "pipelines": ("saferclip.app.commands",)}
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for room, above in rooms.items()
        for path in sorted((PACKAGE / "app" / room).glob("*.py"))
        for module, _, line in imports(path)
        if module.startswith(above)
    ]
    assert not bad, bad


def test_every_console_script_is_a_command_module():
    """pyproject's entry points name ``saferclip.app.commands.<module>:main``, one module each."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {name: target.split(":")[0] for name, target in scripts.items()}
    assert all(t.startswith("saferclip.app.commands.") for t in targets.values()), targets
    assert len(set(targets.values())) == len(targets)
    assert {module_name(p) for p in COMMANDS.glob("*.py") if p.name != "__init__.py"} == set(targets.values())
