"""The config tree and the docs: every shipped config composes and resolves, every experiment
passes the method schema check, the top-level ``conf/`` shows the packaged tree, every
repository path the README and docs name exists, every relative link in them resolves, and
docs/DEVELOPING.md's module map names every module and no module that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.app.pipelines.runs import compose as compose_outside_hydra
from saferclip.training.method import METHOD_NAMES, method_config

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "data" / "README.md"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# what a real-data user sets on the command line (the configs leave them "???")
REAL_DATA = ["paths.visu=/data/visu", "paths.coco=/data/coco"]


def resolved(config_name: str, overrides: list[str]) -> dict:
    """The config fully resolved (with the real-data paths set where the config has them)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose_outside_hydra(config_name, overrides)
        if "paths" in cfg:
            cfg = compose_outside_hydra(config_name, [*overrides, *REAL_DATA])
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_top_level_conf_is_the_packaged_tree():
    top = REPO / "conf"
    assert top.is_dir() and (top / "method").is_dir(), "ls conf/method/ must show the presets"
    assert sorted(p.name for p in (top / "method").glob("*.yaml")) == ["hysac.yaml", "safeclip.yaml", "saferclip.yaml"]
    assert (top / "train.yaml").resolve() == (CONF / "train.yaml").resolve()


def assert_holds(composed: object, written: object, where: str) -> None:
    """Every value the root file writes (read as plain YAML) is in the composed, resolved tree:
    the same plain values, the same keys of its mappings, interpolations resolved."""
    if isinstance(written, dict):
        assert isinstance(composed, dict), where
        for key, value in written.items():
            assert key in composed, f"{where}.{key} is missing"
            assert_holds(composed[key], value, f"{where}.{key}")
    elif isinstance(written, str) and "${" in written:  # resolved (to a value or to null: an unset path)
        assert "${" not in str(composed), (where, composed)
    else:
        assert composed == written, (where, composed, written)


@pytest.mark.parametrize("config_name", ["train", "eval", "main", "study", "eval_visu_vitl14"])
def test_root_configs_compose(config_name):
    cfg = resolved(config_name, [])
    written = yaml.safe_load((CONF / f"{config_name}.yaml").read_text())
    own = {k: v for k, v in written.items() if k not in ("defaults", "hydra")}
    assert own, config_name
    assert_holds(cfg, own, config_name)
    assert "${" not in repr(cfg) and "???" not in repr(cfg)  # every interpolation resolved, nothing missing


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_passes_the_method_check(experiment):
    cfg = resolved("train", [f"experiment={experiment}"])
    assert cfg["method"]["name"] in METHOD_NAMES and cfg["trainer"]["max_epochs"] >= 1
    checked = method_config(cfg["method"])  # the schema every command applies before any work
    assert checked.name == cfg["method"]["name"]


def test_every_experiment_is_checked():
    assert options("experiment"), "no conf/experiment/*.yaml found"
    assert {"toy", "toy_safeclip", "toy_saferclip", "visu_vitl14"} <= set(options("experiment"))


@pytest.mark.parametrize("group", ["method", "model", "data", "trainer", "logger", "callbacks", "debug", "paths"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = resolved("train", [f"{group}={option}"])
        assert cfg["task_name"] == "train", (group, option)


def test_main_and_study_runs_compose():
    for config_name, key in (("main", "runs"), ("study", "methods"), ("study", "ablations")):
        own = resolved(config_name, [])
        for name, overrides in own[key].items():
            cfg = resolved("train", list(overrides))
            assert cfg["method"]["name"] in ("saferclip", "safeclip", "hysac"), (config_name, name)


PATH_PREFIXES = ("saferclip/", "conf/", "scripts/", "tests/", "docs/", ".ci/", "data/")
TOP_FILES = ("pyproject.toml", "README.md")


def mentioned_paths(text: str) -> set[str]:
    """Repository paths in backticks or links: `saferclip/x.py`, [..](docs/X.md)."""
    found = set(re.findall(r"`([^`\s]+)`", text)) | set(re.findall(r"\]\(([^)\s]+)\)", text))
    out = set()
    for token in found:
        token = re.sub(r":\d+(-\d+)?$", "", token.rstrip(".,:;").split("#")[0])  # a line reference
        if any(c in token for c in "<>*{}$="):
            continue  # a placeholder or a pattern
        if token.startswith(PATH_PREFIXES) or token in TOP_FILES:
            out.add(token)
    return out


def pending_result_files() -> set[str]:
    """The result files the documents may name before they are measured: their generated
    regions say the figures are pending (saferclip.evaluation.doc_tables.PENDING)."""
    from saferclip.evaluation.doc_tables import PENDING, RESULTS_DIR, SOURCES

    return {(RESULTS_DIR / SOURCES[name]).as_posix() for name in PENDING}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_the_docs_name_exists(doc):
    paths = mentioned_paths(doc.read_text())
    assert paths, f"{doc.name} names no repository path (the test would check nothing)"
    missing = sorted(p for p in paths if not (REPO / p).exists() and p not in pending_result_files())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_path_finder_sees_what_it_should():
    text = "see `conf/method/saferclip.yaml`, [method](docs/METHOD.md) and `outputs/runs/<name>/`, `saferclip/x.py:12`"
    assert mentioned_paths(text) == {"conf/method/saferclip.yaml", "docs/METHOD.md", "saferclip/x.py"}


FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        out.add(slug.replace(" ", "-"))
    return out


def relative_links(text: str) -> list[str]:
    """Link and image targets outside code blocks that are not URLs."""
    targets = LINK.findall(FENCE.sub("", text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in relative_links(doc.read_text()):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


def test_the_link_finder_sees_what_it_should(tmp_path):
    doc = tmp_path / "X.md"
    doc.write_text(
        "# A `b` title\n[x](Y.md#sec) ![i](img/p.png) [u](https://e.org/a) [s](#a-b-title)\n```\n[c](no.md)\n```\n"
    )
    assert relative_links(doc.read_text()) == ["Y.md#sec", "img/p.png", "#a-b-title"]
    assert anchors(doc) == {"a-b-title"}


def test_the_readme_links_the_docs_it_was_split_into():
    links = set(relative_links((REPO / "README.md").read_text()))
    for doc in (
        "docs/USAGE.md",
        "docs/RESULTS.md",
        "docs/METHOD.md",
        "docs/DOWNSTREAM.md",
        "docs/GPU.md",
        "docs/DEVELOPING.md",
        "data/README.md",
    ):
        assert doc in links, f"README.md does not link {doc}"


def test_the_readme_is_a_front_door():
    """At most 150 lines: what saferclip is, the two commands first, what they give, where to go
    next; tables, recipes and timings live in docs/."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    first_block = text[text.index("```bash") : text.index("```", text.index("```bash") + 3)]
    assert (
        "pip install -e . && saferclip-main" in first_block
        and 'pip install -e ".[dev]" && bash scripts/test.sh' in first_block
    )


def test_developing_map_names_every_module():
    """Every module under saferclip/ appears in docs/DEVELOPING.md, by its path or by its file
    name in the map entry of its package (an entry starts with the package's path)."""
    text = (REPO / "docs" / "DEVELOPING.md").read_text()
    entries = re.split(r"\n- ", text[text.index("## Map") :])
    missing = []
    for module in sorted((REPO / "saferclip").rglob("*.py")):
        rel = module.relative_to(REPO).as_posix()
        package = module.parent.relative_to(REPO).as_posix() + "/"
        if module.name == "__init__.py":
            named = f"`{package}`" in text or package == "saferclip/"
        else:
            named = f"`{rel}`" in text or any(e.startswith(f"`{package}`") and f"`{module.name}`" in e for e in entries)
        if not named:
            missing.append(rel)
    assert not missing, f"docs/DEVELOPING.md's map does not name {missing}"


def map_entries() -> dict[str, str]:
    """docs/DEVELOPING.md's map: package path -> the text of its entry."""
    text = (REPO / "docs" / "DEVELOPING.md").read_text()
    section = text[text.index("## Map") : text.index("\n## ", text.index("## Map") + 1)]
    entries = re.split(r"\n- ", section)
    return {m.group(1): e for e in entries if (m := re.match(r"`(saferclip/(?:\w+/)*)`", e))}


def test_developing_map_names_only_modules_that_exist():
    """The other way round: a module the map names in a package's entry (``name.py``) is a
    module of that package, so a module moved or removed leaves no stale line behind."""
    entries = map_entries()
    assert {"saferclip/model/", "saferclip/redirection/", "saferclip/robustness/", "saferclip/app/"} <= set(entries)
    stale = []
    for package, entry in entries.items():
        for name in re.findall(r"`(\w+\.py)`", entry):
            if not (REPO / package / name).is_file():
                stale.append(f"{package}{name}")
    assert not stale, f"docs/DEVELOPING.md's map names modules that do not exist: {stale}"
