"""The override check every command runs before any work (saferclip/app/overrides.py), in
process: what it refuses and the line it says, what it lets through, and every command line the
docs show passes it. The console scripts' exit code and single line: tests/test_bad_inputs.py."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

from saferclip.app.overrides import check_command, check_flags, check_overrides, compose_plain
from saferclip.app.pipelines.main_job import MAIN_KEYS
from saferclip.app.pipelines.study import STUDY_KEYS
from saferclip.app.pipelines.tune import TUNE_KEYS
from saferclip.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HYDRA_CONFIGS = {"saferclip-train": "train", "saferclip-index": "train", "saferclip-make-image-shards": "train",
                 "saferclip-eval": "eval", "saferclip-analyze": "analyze", "saferclip-attack": "attack"}  # fmt: skip
COMPOSED = {
    "saferclip-main": ("main", MAIN_KEYS),
    "saferclip-study": ("study", STUDY_KEYS),
    "saferclip-tune": ("tune", TUNE_KEYS),
}


def refusal(prog: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        if prog in COMPOSED:
            check_command(prog, *COMPOSED[prog][:1], list(overrides), COMPOSED[prog][1])
        else:
            check_overrides(prog, HYDRA_CONFIGS[prog], list(overrides))
    return str(e.value)


REFUSED = {
    "a typo in a key": (
        ("saferclip-train", "trainer.max_epoch=3"),
        "trainer.max_epoch: no such key; did you mean trainer.max_epochs?",
    ),
    "the same typo with +": (
        ("saferclip-train", "+trainer.max_epoch=3"),
        "trainer.max_epoch: no such key; did you mean trainer.max_epochs?",
    ),
    "the same typo with ++": (
        ("saferclip-train", "++trainer.max_epoch=3"),
        "trainer.max_epoch: no such key; did you mean trainer.max_epochs?",
    ),
    "a typo in the data config": (("saferclip-train", "data.batchsize=8"), "data.batch_size?"),
    "a typo in a method key": (
        ("saferclip-train", "method.neighbours.kk=5"),
        "method.neighbours.kk: no such key; did you mean method.neighbours.k?",
    ),
    "a typo after a group change": (
        ("saferclip-train", "method=hysac", "method.hyperbolic.curvatur=1"),
        "did you mean method.hyperbolic.curvature?",
    ),
    "a key of another method": (
        ("saferclip-train", "method=hysac", "method.trainable.lora_rank=5"),
        "did you mean method.trainable.lora_r?",
    ),
    "+ on a key that exists": (
        ("saferclip-train", "+trainer.max_epochs=3"),
        "trainer.max_epochs is already in the config; drop the + (trainer.max_epochs=3)",
    ),
    "a new model without +": (
        ("saferclip-eval", "models.mine.pretrained=x"),
        "models.mine.pretrained: not in the config yet; add it with +models.mine.pretrained=x",
    ),
    "a group eval does not use": (
        ("saferclip-eval", "model=toy"),
        "model=toy: saferclip-eval has no model group (its groups: analysis, data, paths); did you mean models?",
    ),
    "a group with + eval does not use": (("saferclip-eval", "+method=hysac"), "saferclip-eval has no method group"),
    "an option a group lacks": (
        ("saferclip-train", "method=saferclp"),
        "method=saferclp: no such method (conf/method/saferclp.yaml); did you mean method=saferclip?",
    ),
    "a section that is a value": (
        ("saferclip-train", "seed.x=1"),
        "seed.x: seed is a value (0), not a section with keys",
    ),
    "deleting what is not there": (
        ("saferclip-eval", "~models.nobody"),
        "~models.nobody: models.nobody is not in the config, nothing to delete",
    ),
    "an argument a callback lacks": (
        ("saferclip-train", "+callbacks.early_stopping.patiense=2"),
        "did you mean callbacks.early_stopping.patience?",
    ),
    "main: a typo in a training key": (
        ("saferclip-main", "trainer.max_epoch=3"),
        "trainer.max_epoch: no such key; did you mean trainer.max_epochs?",
    ),
    "main: a typo in its own key": (
        ("saferclip-main", "eval.oracel=text"),
        "eval.oracel: no such key; did you mean eval.oracle?",
    ),
    "study: an unknown preset": (
        ("saferclip-study", "method=nope"),
        "method=nope: no such method (conf/method/nope.yaml)",
    ),
    "tune: a search that does not exist": (
        ("saferclip-tune", "hparams_search=hysak"),
        "did you mean hparams_search=hysac?",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line_with_the_key_meant(case):
    (prog, *overrides), expected = REFUSED[case]
    message = refusal(prog, *overrides)
    assert expected in message and "\n" not in message, message
    assert "Config search path" not in message


ACCEPTED = {
    "saferclip-train": [
        "trainer.max_epochs=3", "++trainer.max_epochs=3", "++trainer.enable_progress_bar=false", "+trainer.gradient_clip_val=1.0",
        "experiment=toy_hysac", "method=safeclip", "+data.image_shards=/tmp/shards", "+data.splits.train.distractor_images=/tmp/d",
        "+callbacks.pause._target_=x.Pause", "+callbacks.model_checkpoint.every_n_epochs=2", "+method.neighbours.pool_index.nprobe=8",
        "~callbacks.early_stopping", "hydra.run.dir=/tmp/x", "~debug",
    ],
    "saferclip-eval": ["+models.mine.pretrained=/tmp/run", "+models.mine.arch=saferclip-micro", "models.original.pretrained=null",
                       "'+data.zeroshot.extra={type: folder, root: /tmp/z}'", "+showcase.queries_per_section=2", "data=visu_text"],
    "saferclip-attack": ["attack.image.budgets_255=[2,4]", "+attack.image.radius=3", "main_runs=false"],
    "saferclip-main": ["seed=1", "trainer.max_epochs=4", "method.neighbours.k=5", "eval.showcase=false", "world=null"],
    "saferclip-study": ["seeds=[0,1]", "traversal_percentiles=[50]", "model=micro", "data.toy_size=small"],
}  # fmt: skip


@pytest.mark.parametrize("prog", list(ACCEPTED))
def test_what_a_command_takes_passes(prog):
    overrides = [shlex.split(o)[0] for o in ACCEPTED[prog]]
    for override in overrides:
        if prog in COMPOSED:
            check_command(prog, COMPOSED[prog][0], [override], COMPOSED[prog][1])
        else:
            check_overrides(prog, HYDRA_CONFIGS[prog], [override])


def test_an_argparse_option_points_at_the_key_value_form():
    train = lambda: [compose_plain("train", [])]  # noqa: E731
    with pytest.raises(
        ConfigError,
        match=r"^--max-epochs: saferclip-train takes key=value overrides, not --options; did you mean trainer\.max_epochs=3\?",
    ):
        check_flags("saferclip-train", ["--max-epochs", "3"], train)
    with pytest.raises(ConfigError, match=r"did you mean seed=4\?"):
        check_flags("saferclip-train", ["--seed=4"], train)
    # Hydra's own options and negative numbers are not refused
    check_flags("saferclip-train", ["--cfg", "job", "-m", "seed=-1", "-1", "--info"], train)
    with pytest.raises(ConfigError, match=r"did you mean trainer\.max_epochs=3\?"):
        check_command("saferclip-study", "study", ["--max-epochs", "3"], STUDY_KEYS)


def documented_command_lines() -> list[tuple[str, str, list[str]]]:
    """``(file, command, overrides)`` of every command line in the README, docs/ and the command
    modules' docstrings (placeholders like ``<run>`` and ``...`` left out)."""
    found = []
    files = [REPO / "README.md", REPO / "data" / "README.md", *map(Path, glob.glob(str(REPO / "docs" / "*.md"))),
             *map(Path, glob.glob(str(REPO / "saferclip" / "app" / "**" / "*.py"), recursive=True))]  # fmt: skip
    for file in files:
        for line in file.read_text().splitlines():
            match = re.search(r"(saferclip-[a-z-]+)((?: +[^\s#`]+)+)", line)
            if not match or match.group(1) not in {**HYDRA_CONFIGS, **COMPOSED}:
                continue
            try:
                args = shlex.split(match.group(2))
            except ValueError:
                continue
            args = [a for a in args if "=" in a and not a.startswith("-") and not re.search(r"[<{]|\.\.\.", a)]
            if args:
                found.append((file.name, match.group(1), args))
    return found


def test_every_documented_command_line_passes_the_check():
    lines = documented_command_lines()
    assert len(lines) > 30  # the README's and the docs' recipes
    for file, prog, args in lines:
        try:
            if prog in COMPOSED:
                check_command(prog, COMPOSED[prog][0], args, COMPOSED[prog][1])
            else:
                check_overrides(prog, HYDRA_CONFIGS[prog], args)
        except ConfigError as e:
            pytest.fail(f"{file}: {prog} {' '.join(args)}: {e}")


def test_the_method_schema_names_the_key_meant():
    """``+method.<key>`` is left to the method's own schema check; it says the key meant."""
    import yaml

    from saferclip.locations import CONF_DIR
    from saferclip.training.method import method_config

    preset = yaml.safe_load((CONF_DIR / "method" / "saferclip.yaml").read_text())
    preset["optimiser"] = {"lr": 1e-3}
    with pytest.raises(ConfigError, match=r"method: unknown keys \['optimiser'\]; did you mean method\.optimizer\?"):
        method_config(preset)
