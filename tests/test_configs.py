"""The config tree and the docs: every shipped config composes and resolves, the top-level
``conf/`` shows the packaged tree, and every repository path the README and docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.app.main_job import compose as compose_outside_hydra

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


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
    assert sorted(p.name for p in (top / "method").glob("*.yaml")) == ["safeclip.yaml", "saferclip.yaml"]
    assert (top / "train.yaml").resolve() == (CONF / "train.yaml").resolve()


@pytest.mark.parametrize("config_name", ["train", "eval", "main", "study", "eval_visu_vitl14"])
def test_root_configs_compose(config_name):
    cfg = resolved(config_name, [])
    assert cfg


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = resolved("train", [f"experiment={experiment}"])
    assert cfg["method"]["name"] in ("saferclip", "safeclip") and cfg["trainer"]["max_epochs"] >= 1


@pytest.mark.parametrize(
    "group", ["method", "model", "data", "trainer", "logger", "callbacks", "debug", "paths"]
)
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = resolved("train", [f"{group}={option}"])
        assert cfg["task_name"] == "train", (group, option)


def test_main_and_study_runs_compose():
    for config_name, key in (("main", "runs"), ("study", "methods"), ("study", "ablations")):
        own = resolved(config_name, [])
        for name, overrides in own[key].items():
            cfg = resolved("train", list(overrides))
            assert cfg["method"]["name"] in ("saferclip", "safeclip"), (config_name, name)


PATH_PREFIXES = ("saferclip/", "conf/", "scripts/", "tests/", "docs/", ".ci/")
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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_the_docs_name_exists(doc):
    paths = mentioned_paths(doc.read_text())
    assert paths, f"{doc.name} names no repository path (the test would check nothing)"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_path_finder_sees_what_it_should():
    text = "see `conf/method/saferclip.yaml`, [method](docs/METHOD.md) and `outputs/runs/<name>/`, `saferclip/x.py:12`"
    assert mentioned_paths(text) == {"conf/method/saferclip.yaml", "docs/METHOD.md", "saferclip/x.py"}
