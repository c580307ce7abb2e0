"""Every third-party module the package imports is declared in pyproject.toml.

A module found only because something else pulled it in, or because it was installed by hand,
is missing on a fresh machine: CI once passed only where scipy had been installed by hand.
Each import must be a base dependency, or belong to an extra (and then sit behind an error or a
fallback that names it; the extras' own tests check those).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[ <>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extras = {extra: {_requirement_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    return base, extras


def _third_party_imports() -> dict[str, set[str]]:
    """top-level module -> the files under saferclip/ that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "saferclip").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "saferclip" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


# import name -> distribution name, where they differ and the distribution may not be installed
# here (an extra's package absent from this environment cannot be looked up)
KNOWN_DISTRIBUTIONS = {"umap": "umap-learn", "yaml": "pyyaml", "PIL": "pillow", "faiss": "faiss-cpu"}


def test_every_third_party_import_is_declared():
    base, extras = _declared()
    declared = base.union(*extras.values())
    installed = metadata.packages_distributions()
    undeclared = []
    for module, files in sorted(_third_party_imports().items()):
        candidates = {_normalise(d) for d in installed.get(module, [])}
        candidates |= {_normalise(KNOWN_DISTRIBUTIONS.get(module, module))}
        if not candidates & declared:
            undeclared.append(f"{module} (imported in {', '.join(sorted(files))})")
    assert not undeclared, "imported under saferclip/ but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_the_dependency_scan_sees_real_imports():
    # the scan itself must work: it finds the core imports the package cannot run without
    imports = _third_party_imports()
    assert {"torch", "open_clip", "numpy", "scipy"} <= set(imports)
    base, _ = _declared()
    assert {"torch", "scipy", "faiss-cpu"} <= base
