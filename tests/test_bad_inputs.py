"""A corpus of bad inputs fed through the console scripts.

Every case must end with exit code 2 and one line on stderr that names the file, row, field
or key at fault — never a traceback, never a silent acceptance. Data cases run
``saferclip-train dry_run=true`` (which loads every split and parses every image header),
so they cost a command each, not a training run. The commands run inside the test's
interpreter (tests/cli_helpers.py: the installed entry point's ``main``, its exit code and
output), a process start being most of a case's time; the installed scripts themselves run
in subprocesses in the ``--help`` test (every script) and in the cases that pass
``installed=True`` (at least one error case per command that has them).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import run_in_process
from PIL import Image
from train_helpers import installed_script, time_budget

pytestmark = pytest.mark.slow


def command(name: str, *args: str) -> list[str]:
    """The installed console script (the interpreter's own ``bin/``; missing: the test fails)."""
    return [installed_script(name), *args]


# a test runs at most five commands (the damaged-cache one): 5 x 100 s fit its 600 s limit
COMMAND_TIMEOUT = 100


def run(
    name: str, *args: str, cwd: Path, env: dict | None = None, installed: bool = False
) -> subprocess.CompletedProcess:
    """``name args...`` in ``cwd``: in this interpreter (tests/cli_helpers.py), or with
    ``installed`` the installed console script in a subprocess."""
    base = dict(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base["SAFERCLIP_CACHE_DIR"] = str(cwd / "cache")
    if not installed:
        return run_in_process(name, *args, cwd=cwd, env={**base, **(env or {})})
    return subprocess.run(
        command(name, *args),
        cwd=cwd,
        env={**os.environ, **base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output and "Config search path" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


# ---------------------------------------------------------------- the world each case corrupts
@pytest.fixture
def world(tmp_path, toy_world) -> Path:
    """A private copy of the small toy world."""
    copy = tmp_path / "world"
    shutil.copytree(toy_world, copy)
    return copy


def dry_run_args(world: Path, *extra: str) -> list[str]:
    return [
        "dry_run=true",
        "model=micro",
        "data.make_toy=false",
        f"data.root={world}",
        f"paths.output_dir={world.parent / 'out'}",
        *extra,
    ]


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Change a JSON file's data in place (``change``'s return value is ignored)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def records(data: dict) -> dict:
    """The records of a ViSU JSON in either layout."""
    return data["data"] if "data" in data else data


def bomb(path: Path) -> None:
    """A PNG whose header claims far more pixels than PIL will decode (a decompression bomb)."""
    Image.new("1", (14000, 14000)).save(
        path
    )  # 196 M pixels > 2 x PIL's 89 M limit (an error there); 1-bit: a small file


# ViSU JSON, both layouts: train.json is {"info", "data"}, validation.json keyed by index
VISU_CASES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "not json": ("train", lambda p: p.write_text('{"data": {"0": {"safe": "a'), ("train.json", "JSON")),
    "a number": ("validation", lambda p: p.write_text("42"), ("validation.json", "expected a JSON object")),
    "record not an object": (
        "train",
        lambda p: edit_json(p, lambda d: records(d).update({"3": "text"})),
        ("train.json", "row 3"),
    ),
    "missing field": (
        "validation",
        lambda p: edit_json(p, lambda d: records(d)["2"].pop("nsfw")),
        ("validation.json", "row 2", "'nsfw'"),
    ),
    "caption not text": (
        "train",
        lambda p: edit_json(p, lambda d: records(d)["1"].update(safe=7)),
        ("train.json", "row 1", "'safe'"),
    ),
    "empty caption": (
        "train",
        lambda p: edit_json(p, lambda d: records(d)["4"].update(nsfw="  ")),
        ("train.json", "row 4", "'nsfw'"),
    ),
    "coco id not a number": (
        "validation",
        lambda p: edit_json(p, lambda d: records(d)["5"].update(coco_id="abc")),
        ("validation.json", "row 5", "'coco_id'"),
    ),
    "unsafe image missing": (
        "train",
        lambda p: edit_json(p, lambda d: records(d)["6"].update(nsfw_im_path="nsfw/none.png")),
        ("train.json", "row 6", "'nsfw_im_path'", "none.png"),
    ),
    "unsafe image a folder": (
        "train",
        lambda p: edit_json(p, lambda d: records(d)["0"].update(nsfw_im_path="nsfw")),
        ("train.json", "row 0", "is a directory"),
    ),
    "no records": ("validation", lambda p: p.write_text("{}"), ("validation.json",)),
}


@pytest.mark.parametrize("case", list(VISU_CASES))
def test_malformed_visu_json_is_one_line(world, case):
    split, corrupt, names = VISU_CASES[case]
    corrupt(world / "visu" / f"{split}.json")
    installed = case == "not json"  # one case through the installed script
    assert_one_line_error(run("saferclip-train", *dry_run_args(world), cwd=world.parent, installed=installed), *names)


IMAGE_CASES: dict[str, Callable[[Path], None]] = {
    "corrupt safe image": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not really"),
    "text as image": lambda p: p.write_text("hello"),
    "decompression bomb": bomb,
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images_are_named_by_the_dry_run(world, case):
    record = json.loads((world / "visu" / "train.json").read_text())["data"]["3"]
    image = world / "visu" / "train2017" / f"{record['coco_id']:012d}.png"
    IMAGE_CASES[case](image)
    line = assert_one_line_error(
        run("saferclip-train", *dry_run_args(world), cwd=world.parent), image.name, "row 3", "'coco_id'"
    )
    if case == "decompression bomb":
        assert "too large" in line


def test_bad_image_is_named_by_the_evaluation(world):
    victim = sorted((world / "zeroshot" / "shape" / "test").rglob("*.png"))[1]
    bomb(victim)
    args = ["data.make_toy=false", f"data.root={world}", "suites=[zeroshot]", f"out_dir={world.parent / 'eval'}",
            "models.original.arch=saferclip-micro", "models.original.pretrained=null"]  # fmt: skip
    assert_one_line_error(run("saferclip-eval", *args, cwd=world.parent, installed=True), victim.name, "too large")


def rewrite_csv(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")


def edit_rows(path: Path, change: Callable[[list[str], list[dict]], tuple[list[str], list[dict]]]) -> None:
    """Rewrite a CSV table through ``change(header, rows) -> (header, rows)``."""
    import csv

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = change(list(reader.fieldnames or []), list(reader))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _set(rows: list[dict], index: int, **values: str) -> list[dict]:
    rows[index].update(values)
    return rows


TABLE_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing column": (
        lambda p: rewrite_csv(p, lambda ls: [ls[0].replace(",nsfw,", ",nsfw_x,"), *ls[1:]]) or p,
        ("train.csv", "nsfw"),
    ),
    "id not a number": (
        lambda p: rewrite_csv(p, lambda ls: [ls[0], "x" + ls[1], *ls[2:]]) or p,
        ("train.csv", "row 1", "'incremental_id'"),
    ),
    "duplicate id": (lambda p: rewrite_csv(p, lambda ls: [ls[0], ls[1], ls[1], *ls[2:]]) or p, ("train.csv", "row 2")),
    "broken jsonl line": (lambda p: _jsonl_with_broken_line(p), ("train.jsonl", "row 3", "invalid JSON")),
    "parquet that is text": (lambda p: _fake_parquet(p), ("train.parquet",)),
    "unknown format": (
        lambda p: p.rename(p.with_suffix(".txt")) or p.with_suffix(".txt"),
        ("train.txt", "unknown format"),
    ),
}


def _jsonl_with_broken_line(csv_path: Path) -> Path:
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    out = csv_path.with_suffix(".jsonl")
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-10]
    out.write_text("\n".join(lines) + "\n")
    return out


def _fake_parquet(csv_path: Path) -> Path:
    out = csv_path.with_suffix(".parquet")
    out.write_text("not parquet at all")
    return out


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_malformed_visu_text_table_is_one_line(world, case):
    corrupt, names = TABLE_CASES[case]
    train = corrupt(world / "visu_text" / "train.csv")
    args = ["dry_run=true", "model=micro", "data=visu_text", f"paths.visu={world / 'visu_text'}", f"data.splits.train.path={train}",
            f"paths.coco={world / 'visu'}", "data.splits.train.image_root=null", "data.splits.validation.image_root=null",
            "data.splits.test.image_root=null", f"paths.output_dir={world.parent / 'out'}"]  # fmt: skip
    assert_one_line_error(run("saferclip-train", *args, cwd=world.parent), *names)


NSFW_CAPS_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "missing column": (
        lambda h, rows: ([c for c in h if c != "nsfw_caption"], rows),
        ("nsfw_caps.csv", "nsfw_caption"),
    ),
    "image missing": (
        lambda h, rows: (h, _set(rows, 0, image_coco_url="https://toy.invalid/nocaps/val/gone.png")),
        ("nsfw_caps.csv", "row 1", "'image_coco_url'", "gone.png"),
    ),
    "empty caption": (lambda h, rows: (h, _set(rows, 1, caption="")), ("nsfw_caps.csv", "row 2", "'caption'")),
}


@pytest.mark.parametrize("case", list(NSFW_CAPS_CASES))
def test_malformed_nsfw_caps_is_one_line(world, case):
    change, names = NSFW_CAPS_CASES[case]
    edit_rows(world / "nsfw_caps" / "nsfw_caps.csv", change)
    args = ["data.make_toy=false", f"data.root={world}", "suites=[nsfw_caps]", f"out_dir={world.parent / 'eval'}",
            "models.original.arch=saferclip-micro", "models.original.pretrained=null"]  # fmt: skip
    assert_one_line_error(run("saferclip-eval", *args, cwd=world.parent), *names)


def test_skipping_bad_rows_is_counted_and_reported(world):
    edit_json(world / "visu" / "train.json", lambda d: records(d)["1"].update(safe=7))
    proc = run("saferclip-train", *dry_run_args(world, "data.on_error=skip"), cwd=world.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 malformed rows" in proc.stdout + proc.stderr and "row 1" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- checkpoints and weights
class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_malicious_checkpoint_is_refused_even_when_the_environment_allows_unsafe_loads(world):
    import torch

    marker, evil = world.parent / "marker", world.parent / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(str(marker))}, evil)  # a torch zip that needs pickle
    raw = world.parent / "raw.ckpt"
    raw.write_bytes(pickle.dumps(Payload(str(marker))))  # a bare pickle
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    for bad in (evil, raw):
        args = [
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"ckpt_path={bad}",
            f"hydra.run.dir={world.parent / 'run'}",
        ]
        assert_one_line_error(run("saferclip-train", *args, cwd=world.parent, env=env), bad.name)
        assert not marker.exists(), "the checkpoint's code ran"
    for name, args in (
        (
            "saferclip-eval",
            [
                "data.make_toy=false",
                f"data.root={world}",
                "suites=[zeroshot]",
                f"+models.x.pretrained={evil}",
                "+models.x.arch=saferclip-micro",
            ],
        ),
        ("saferclip-export", [str(evil), str(world.parent / "exported")]),
    ):
        assert_one_line_error(
            run(name, *args, cwd=world.parent, env=env, installed=name == "saferclip-export"), evil.name
        )
        assert not marker.exists()


def test_broken_checkpoints_and_weights_are_one_line(world):
    base = ["model=micro", "data.toy_size=small", f"paths.toy_dir={world}", f"hydra.run.dir={world.parent / 'run'}"]
    text = world.parent / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    assert_one_line_error(run("saferclip-train", *base, f"ckpt_path={text}", cwd=world.parent), "notes.ckpt")
    assert_one_line_error(run("saferclip-train", *base, f"ckpt_path={world}", cwd=world.parent), "is a directory")
    cut = world.parent / "cut.safetensors"
    cut.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": ')
    assert_one_line_error(
        run("saferclip-train", *base, "dry_run=true", f"model.pretrained={cut}", cwd=world.parent), "cut.safetensors"
    )


# ---------------------------------------------------------------- configuration and overrides
CONFIG_CASES: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "negative lr": ("saferclip-train", ["method.optimizer.lr=-1"], ("method.optimizer.lr",)),
    "k larger than the pool": (
        "saferclip-train",
        ["method.neighbours.k=1000"],
        ("method.neighbours.k=1000", "larger than the safe pool"),
    ),
    "negative loss weight": ("saferclip-train", ["method.loss.weights.text_preservation=-1"], ("loss weights",)),
    "unknown neighbour mode": (
        "saferclip-train",
        ["method.neighbours.mode=bogus"],
        ("unknown neighbour mode 'bogus'",),
    ),
    "zero lora rank": ("saferclip-train", ["method.trainable.lora_r=0"], ("method.trainable.lora_r",)),
    "unknown method key": ("saferclip-train", ["+method.learning_rate=1"], ("unknown keys ['learning_rate']",)),
    "zero batch size": ("saferclip-train", ["data.batch_size=0"], ("data.batch_size",)),
    "bad data mode": ("saferclip-train", ["data.mode=bogus"], ("data.mode",)),
    "bad on_error": ("saferclip-train", ["data.on_error=ignore"], ("data.on_error",)),
    "zero epochs": ("saferclip-train", ["trainer.max_epochs=0"], ("trainer.max_epochs",)),
    "no such preset": ("saferclip-train", ["method=nope"], ("method/nope",)),
    "no such key": ("saferclip-train", ["method.lrr=1"], ("method.lrr",)),
    "bad override syntax": ("saferclip-train", ["method.optimizer.lr=[1"], ("method.optimizer.lr",)),
    "index: zero k": ("saferclip-index", ["method.neighbours.k=0"], ("k must be a positive integer",)),
    "index: bad override": ("saferclip-index", ["method=nope"], ("method/nope",)),
    "eval: unknown suite": ("saferclip-eval", ["suites=[visu,bogus]"], ("unknown suite(s) ['bogus']",)),
    "eval: bad override": ("saferclip-eval", ["data=nope"], ("data/nope",)),
    "main: zero epochs": ("saferclip-main", ["trainer.max_epochs=0"], ("trainer.max_epochs",)),
    "study: negative lr": ("saferclip-study", ["seeds=[0]", "method.optimizer.lr=-1"], ("method.optimizer.lr",)),
    "main: bad override": ("saferclip-main", ["method=nope"], ("method/nope",)),
    "study: ablation seed outside seeds": (
        "saferclip-study",
        ["seeds=[0]", "ablation_seeds=[7]"],
        ("ablation_seeds [7]", "not in seeds [0]"),
    ),
    "train: seed not a number": ("saferclip-train", ["seed=abc"], ("seed must be an integer", "'abc'")),
    "train: negative seed": ("saferclip-train", ["seed=-1"], ("seed must be an integer", "-1")),
    "main: seed not a number": ("saferclip-main", ["seed=1.5"], ("seed must be an integer", "1.5")),
    "study: seeds not a list": (
        "saferclip-study",
        ["seeds=abc"],
        ("seeds must be a list of distinct integers", "'abc'"),
    ),
    "study: no seeds": ("saferclip-study", ["seeds=[]", "ablation_seeds=[]"], ("seeds is empty",)),
    "study: fractional seed": ("saferclip-study", ["seeds=[0.5]"], ("seeds=[0.5]", "0.5 is not a seed")),
    "study: seed a word": ("saferclip-study", ["seeds=[a]"], ("seeds=['a']", "'a' is not a seed")),
    "study: negative seed": ("saferclip-study", ["seeds=[-1]"], ("seeds=[-1]", "-1 is not a seed")),
    "study: duplicate seeds": ("saferclip-study", ["seeds=[0,0]"], ("seeds=[0, 0]", "[0] appear twice")),
    "study: bad ablation seeds": ("saferclip-study", ["seeds=[0]", "ablation_seeds=[x]"], ("ablation_seeds=['x']",)),
    "analyze: per_class not a number": (
        "saferclip-analyze",
        ["analysis.detector.per_class=many"],
        ("analysis.detector.per_class must be an integer >= 1", "'many'"),
    ),
    "analyze: zero folds": (
        "saferclip-analyze",
        ["analysis.detector.folds=0"],
        ("analysis.detector.folds must be an integer >= 2",),
    ),
    "eval: force not a bool": ("saferclip-eval", ["force=yes"], ("force must be true or false", "'yes'")),
    "eval: batch size a word": ("saferclip-eval", ["batch_size=abc"], ("batch_size must be an integer >= 1", "'abc'")),
    "eval: seed a word": ("saferclip-eval", ["seed=abc"], ("seed must be an integer", "'abc'")),
    "analyze: negative workers": ("saferclip-analyze", ["num_workers=-2"], ("num_workers must be an integer >= 0",)),
    "analyze: main_runs a word": ("saferclip-analyze", ["main_runs=maybe"], ("main_runs must be true or false",)),
    "train: dry_run a word": ("saferclip-train", ["dry_run=maybe"], ("dry_run must be true or false",)),
    "main: force a word": ("saferclip-main", ["force=yes"], ("force must be true or false",)),
    "study: force a word": ("saferclip-study", ["seeds=[0]", "force=yes"], ("force must be true or false",)),
    "analyze: strength a word": (
        "saferclip-analyze",
        ["analysis.detector.strength=high"],
        ("analysis.detector.strength must be a finite number or null",),
    ),
    # keys, groups and options checked against the command's config (saferclip/app/overrides.py)
    "train: a typo in a key": (
        "saferclip-train",
        ["trainer.max_epoch=3"],
        ("trainer.max_epoch: no such key; did you mean trainer.max_epochs?",),
    ),
    "train: the typo with + (dry run)": (
        "saferclip-train",
        ["+trainer.max_epoch=3"],
        ("trainer.max_epoch: no such key; did you mean trainer.max_epochs?",),
    ),
    "train: an argparse option": (
        "saferclip-train",
        ["--max-epochs", "3"],
        ("--max-epochs: saferclip-train takes key=value", "did you mean trainer.max_epochs=3?"),
    ),
    "train: no such preset, no search path": (
        "saferclip-train",
        ["method=nonexistent"],
        ("method=nonexistent: no such method", "hysac, safeclip, saferclip"),
    ),
    "eval: a group it does not use": (
        "saferclip-eval",
        ["model=toy"],
        ("saferclip-eval has no model group", "did you mean models?", "+models.<name>.pretrained="),
    ),
    "eval: a new model without +": (
        "saferclip-eval",
        ["models.mine.pretrained=x"],
        ("add it with +models.mine.pretrained=x",),
    ),
    "main: a typo in a key": ("saferclip-main", ["trainer.max_epoch=3"], ("did you mean trainer.max_epochs?",)),
    "study: an argparse option": (
        "saferclip-study",
        ["--max-epochs", "3"],
        ("--max-epochs: saferclip-study takes key=value", "trainer.max_epochs=3"),
    ),
    "study: percentile 0": (
        "saferclip-study",
        ["seeds=[0]", "traversal_percentiles=[0]"],
        ("traversal_percentiles=[0]", "0 is not a percentile in (0, 100]"),
    ),
    "attack: budgets a word": (
        "saferclip-attack",
        ["attack.image.budgets_255=abc"],
        ("attack.image.budgets_255 must be a list of grey levels", "'abc'"),
    ),
    "attack: budgets a list of words": (
        "saferclip-attack",
        ["attack.image.budgets_255=[abc]"],
        ("attack.image.budgets_255 must be a list of grey levels", "['abc']"),
    ),
    "attack: a typo in a key": (
        "saferclip-attack",
        ["attack.image.step=3"],
        ("attack.image.step: no such key; did you mean attack.image.steps?",),
    ),
}


# the first case of each command runs the installed script
INSTALLED_CONFIG_CASES = {
    next(case for case, (n, _, _) in CONFIG_CASES.items() if n == name) for name, _, _ in CONFIG_CASES.values()
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configuration_is_one_line_before_any_work(world, case):
    name, overrides, names = CONFIG_CASES[case]
    out = world.parent / "out"
    common = {
        "saferclip-train": [
            "dry_run=true",
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"paths.output_dir={out}",
        ],
        "saferclip-index": ["model=micro", "data.toy_size=small", f"paths.toy_dir={world}", f"paths.output_dir={out}"],
        "saferclip-eval": ["data.make_toy=false", f"data.root={world}", f"paths.output_dir={out}"],
        "saferclip-main": [
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"out_dir={out}",
            f"runs_dir={out / 'runs'}",
        ],
        "saferclip-study": [
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"out_dir={out}",
            f"runs_dir={out / 'runs'}",
        ],
        "saferclip-analyze": ["data.make_toy=false", f"data.root={world}", f"paths.output_dir={out}"],
        "saferclip-attack": ["data.make_toy=false", f"data.root={world}", f"paths.output_dir={out}"],
    }[name]
    line = assert_one_line_error(
        run(name, *common, *overrides, cwd=world.parent, installed=case in INSTALLED_CONFIG_CASES), *names
    )
    assert "LexerNoViableAlt" not in line
    assert not (world.parent / "cache").exists()  # stopped before any embedding work
    assert not (out / "runs").exists()  # no training started


# ---------------------------------------------------------------- commands that look for trained runs
@pytest.mark.parametrize("name", ["saferclip-attack", "saferclip-analyze"])
@pytest.mark.parametrize("runs", ["empty", "missing", "default"])
def test_no_trained_runs_is_one_line_naming_where_it_looked(world, tmp_path, name, runs):
    """main_runs=true finding no finished run of saferclip-main: refused (not the original alone)."""
    folder = {
        "empty": tmp_path / "runs",
        "missing": tmp_path / "nowhere",
        "default": tmp_path / "home" / "outputs" / "runs",
    }[runs]
    if runs == "empty":
        folder.mkdir()
    args = ["data.make_toy=false", f"data.root={world}", f"paths.output_dir={tmp_path / 'out'}"]
    args += [] if runs == "default" else [f"runs_dir={folder}"]
    proc = run(
        name,
        *args,
        cwd=tmp_path,
        env={"SAFERCLIP_HOME": str(tmp_path / "home"), "SAFERCLIP_OUTPUT_DIR": str(tmp_path / "home" / "outputs")},
    )
    line = assert_one_line_error(
        proc,
        "main_runs=true: no finished saferclip-main run in",
        str(folder),
        "main_runs=false +models.<name>.pretrained=",
    )
    assert ("(no such folder)" in line) == (runs != "empty")
    assert not list((tmp_path / "out").rglob("*.json")) and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- what the real run refuses, the dry run refuses
def test_the_dry_run_says_when_the_image_shards_are_damaged(world, tmp_path):
    """Damaged shards: training reads the image files instead (a one-line warning); the dry run
    says the same, and the same way."""
    shards = tmp_path / "shards"
    made = run("saferclip-make-image-shards", *dry_run_args(world, f"+data.image_shards={shards}")[1:], cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    ok = run("saferclip-train", *dry_run_args(world, f"+data.image_shards={shards}"), cwd=tmp_path)
    assert ok.returncode == 0 and "'image_shards': 'used'" in ok.stdout + ok.stderr, ok.stderr[-3000:]
    _flip(shards / "train" / "images.npy")
    proc = run("saferclip-train", *dry_run_args(world, f"+data.image_shards={shards}"), cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert (
        len(warnings) == 1
        and str(shards / "train" / "images.npy") in warnings[0]
        and "reading the image files" in warnings[0]
    ), warnings
    assert "'image_shards': 'damaged" in output


def _pool(folder: Path, vectors, captions: list[str]) -> Path:
    import numpy as np
    import pandas as pd

    (folder / "text_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "text_emb" / "text_emb_0.npy", np.asarray(vectors, dtype=np.float32))
    pd.DataFrame({"caption": captions}).to_parquet(folder / "metadata" / "metadata_0.parquet")
    return folder


def test_the_dry_run_checks_an_embedded_extra_pool_as_training_does(world, tmp_path):
    """A pool of the wrong width, with a NaN row past the first 1,024, or embedded by another
    model: each refused by the dry run in one line naming the pool (training refuses them too:
    tests/test_large_pool.py)."""
    import numpy as np
    import torch

    from saferclip.model.build import build_clip, encode_text

    captions = sorted(
        {r["safe"] for r in records(json.loads((world / "visu" / "validation.json").read_text())).values()}
    )
    rows = (captions * (1 + 1500 // len(captions)))[:1500]  # past the first 1,024 rows
    micro = build_clip("saferclip-micro")  # the dry run's model=micro (the same seeded init)
    good = encode_text(micro, rows, 256).float().numpy()
    wide = np.concatenate([good, good], axis=1) / np.sqrt(2)
    late_nan = good.copy()
    late_nan[1300] = np.nan
    noise = torch.nn.functional.normalize(
        torch.randn(good.shape, generator=torch.Generator().manual_seed(0)), dim=1
    ).numpy()
    pools = {
        name: _pool(tmp_path / name, v, rows)
        for name, v in (("good", good), ("wide", wide), ("nan", late_nan), ("other", noise))
    }
    fine = run("saferclip-train", *dry_run_args(world, f"method.neighbours.extra_pool={pools['good']}"), cwd=tmp_path)
    assert fine.returncode == 0, fine.stderr[-3000:]
    dim = good.shape[1]
    for name, names in (
        ("wide", ("method.neighbours.extra_pool", str(pools["wide"]), f"holds {2 * dim}-d vectors", f"in {dim}-d")),
        ("nan", (str(pools["nan"] / "text_emb" / "text_emb_0.npy"), "row 1300", "finite")),
        ("other", (str(pools["other"]), "not made by this model")),
    ):
        proc = run("saferclip-train", *dry_run_args(world, f"method.neighbours.extra_pool={pools[name]}"), cwd=tmp_path)
        assert_one_line_error(proc, *names)


def test_a_hysac_export_without_its_head_is_refused(world, tmp_path):
    """Its config says hyperbolic: without the head files it must not load as a cosine CLIP."""
    from saferclip.export.open_clip import export_open_clip
    from saferclip.model.build import build_clip

    folder = export_open_clip(
        build_clip("saferclip-micro"),
        None,
        tmp_path / "hysac-export",
        metadata={"method": "hysac", "geometry": "lorentz"},
    )
    args = ["data.make_toy=false", f"data.root={world}", "suites=[zeroshot]", f"out_dir={tmp_path / 'eval'}",
            f"+models.h.pretrained={folder}", "+models.h.arch=saferclip-micro", "models.original.arch=saferclip-micro",
            "models.original.pretrained=null"]  # fmt: skip
    assert_one_line_error(
        run("saferclip-eval", *args, cwd=tmp_path),
        str(folder),
        "hyperbolic_head.json",
        "hyperbolic_head.safetensors",
        "both missing",
    )
    assert not (tmp_path / "eval" / "results.json").exists()


# ---------------------------------------------------------------- folders that cannot be written
def _blocked(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    return blocker


@pytest.mark.parametrize("where", ["hydra.run.dir", "paths.output_dir", "sweep"])
def test_a_run_folder_that_cannot_be_created_is_one_line(world, tmp_path, where):
    """Hydra creates the run (or sweep) folder before the task starts: its failure is one line too."""
    blocker = _blocked(tmp_path)
    args = ["dry_run=true", "model=micro", "data.toy_size=small", f"paths.toy_dir={world}"]
    if where == "sweep":
        args += ["-m", "seed=0,1", f"paths.output_dir={blocker}"]
    else:
        args.append(f"{where}={blocker / 'run'}")
    if where == "hydra.run.dir":
        args.append(f"paths.output_dir={tmp_path / 'out'}")
    assert_one_line_error(run("saferclip-train", *args, cwd=tmp_path), "a-file", "is a file, not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        args = [
            "dry_run=true",
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"paths.output_dir={ro}",
        ]
        assert_one_line_error(run("saferclip-train", *args, cwd=tmp_path), str(ro), "not writable")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("name", ["saferclip-main", "saferclip-study", "saferclip-eval"])
def test_an_out_dir_in_the_way_is_one_line_before_any_work(world, tmp_path, name):
    blocker = _blocked(tmp_path)
    args = {
        "saferclip-main": [
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            f"out_dir={blocker}",
            f"runs_dir={tmp_path / 'runs'}",
        ],
        "saferclip-study": [
            "model=micro",
            "data.toy_size=small",
            f"paths.toy_dir={world}",
            "seeds=[0]",
            f"out_dir={tmp_path / 'o'}",
            f"runs_dir={blocker / 'runs'}",
        ],
        "saferclip-eval": [
            "data.make_toy=false",
            f"data.root={world}",
            f"out_dir={blocker / 'x'}",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
    }[name]
    assert_one_line_error(run(name, *args, cwd=tmp_path), "a-file", "is a file, not a folder")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- damaged artefacts (checksums)
def _flip(path: Path, back: int = 100, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - back, len(data) - back + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_damaged_cache_and_neighbours_are_rebuilt_by_the_index_command(world, tmp_path):
    """Flipped bytes or NaNs in a cache array, flipped neighbour weights, indices rotated by a
    row: each is warned about in one line naming the file, rebuilt, and the summary is the
    undamaged one."""
    import numpy as np

    args = ["model=micro", "data.toy_size=small", f"paths.toy_dir={world}", f"paths.output_dir={tmp_path / 'out'}"]
    first = run("saferclip-index", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = json.loads(next((tmp_path / "out").rglob("index_summary.json")).read_text())
    cache = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    neighbours = next((cache / "neighbours").iterdir())

    def nan_row(path: Path) -> None:
        arr = np.load(path, mmap_mode="r+")
        arr[5] = np.nan
        arr.flush()

    def rotate(path: Path) -> None:
        np.save(path, np.roll(np.load(path), 1, axis=0))

    damages = [(cache / "unsafe_text.npy", _flip), (cache / "safe_image.npy", nan_row),
               (neighbours / "weights.npy", _flip), (neighbours / "indices.npy", rotate)]  # fmt: skip
    for victim, damage in damages:
        for old in (tmp_path / "out").rglob("index_summary.json"):
            old.unlink()
        damage(victim)
        proc = run("saferclip-index", *args, cwd=tmp_path)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
        warnings = [line for line in output.splitlines() if "WARNING" in line]
        assert len(warnings) == 1 and str(victim) in warnings[0] and "damaged" in warnings[0], (victim, warnings)
        summary = json.loads(next((tmp_path / "out").rglob("index_summary.json")).read_text())
        assert summary["cache_reused"] == (victim.parent != cache), victim
        for key in ("similarity", "text_difficulty", "bucket_sizes", "examples", "not_own_pair"):
            assert summary[key] == expected[key], (victim, key)


def test_a_damaged_detector_is_refused_by_saferclip_detect(tmp_path):
    import torch

    from saferclip.analysis.detector import LinearDetector, save_detectors

    det = LinearDetector("text", torch.nn.functional.normalize(torch.arange(16.0) - 3, dim=0), 0.25, 0.05, "logistic", layer=0, head=1,
                         model={"arch": "saferclip-micro", "source": "none"})  # fmt: skip
    path = save_detectors(tmp_path / "det.safetensors", {"text": det})
    _flip(path, back=32)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\na knife\n")
    assert_one_line_error(
        run("saferclip-detect", str(path), str(captions), cwd=tmp_path, installed=True),
        "det.safetensors",
        "damaged",
        "checksum mismatch",
        "saferclip-analyze",
    )
    assert not (tmp_path / "captions.flags.csv").exists()


GENERATE_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "negative limit": (["--limit", "-1"], ("--limit -1", ">= 1")),
    "height not a multiple of 8": (["--height", "100"], ("--height 100", "multiple of 8")),
    "guidance nan": (["--guidance", "nan"], ("--guidance nan", "finite")),
    "missing local pipeline": (["--pipeline", "./my-sd-pipeline"], ("--pipeline ./my-sd-pipeline", "no such folder")),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_visu_arguments_are_one_line(world, tmp_path, case):
    extra, names = GENERATE_CASES[case]
    args = [
        str(world / "visu_text" / "test.csv"),
        str(tmp_path / "gen"),
        "--device",
        "cpu",
        "--scorer-pretrained",
        "none",
        *extra,
    ]
    installed = case == "negative limit"  # one case through the installed script
    assert_one_line_error(run("saferclip-generate-visu", *args, cwd=tmp_path, installed=installed), *names)
    assert not (tmp_path / "gen").exists()


def test_outputs_are_never_overwritten_without_force(world, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert_one_line_error(
        run("saferclip-make-toy", "--small", "--out", str(other), cwd=tmp_path, installed=True), "mine", "force"
    )
    assert (other / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- help and startup
def entry_points() -> list[str]:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return sorted(pyproject["project"]["scripts"])


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_console_script_answers_help(tmp_path, flag):
    # the scripts share the test's time (a start took ~20 s on a loaded 2-core machine): a hung
    # one fails with its name rather than the whole test with a stack
    left = time_budget()
    for name in entry_points():
        if flag == "-h":  # the short form in this interpreter; --help through every installed script
            proc = run_in_process(name, flag, cwd=tmp_path)
        else:
            proc = subprocess.run(
                [installed_script(name), flag], cwd=tmp_path, capture_output=True, text=True, timeout=left()
            )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (name, output[-2000:])
        assert "usage:" in output and "Traceback" not in output, (name, output[-2000:])
        assert "README.md" in output, (name, output[-2000:])  # where the docs are
        # what it does, then at least one example: a command line of this very script
        examples = output.split("Examples:", 1)[-1].splitlines() if "Examples:" in output else []
        assert any(line.strip().startswith(f"{name} ") or line.strip() == name for line in examples), (
            name,
            output[-2000:],
        )


def test_help_imports_neither_torch_nor_open_clip(tmp_path):
    """--help of every console script answers before the heavy libraries load: what it prints
    comes from the command's module and the config files, not from a model (the times:
    scripts/bench_help.py)."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    code = (
        "import sys, contextlib, io, importlib\n"
        f"scripts = {dict(scripts)!r}\n"
        "for name, target in scripts.items():\n"
        "    module, func = target.split(':')\n"
        "    sys.argv = [name, '--help']\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            getattr(importlib.import_module(module), func)()\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (name, e.code)\n"
        "    heavy = sorted(m for m in ('torch', 'open_clip', 'lightning', 'faiss') if m in sys.modules)\n"
        "    assert not heavy, f'{name} --help imported {heavy}'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_commands_do_not_import_wandb_unless_asked(tmp_path):
    code = (
        "import sys\n"
        "import saferclip.app.commands.train, saferclip.app.engine.fit, saferclip.app.commands.main_job, saferclip.app.pipelines.main_job, saferclip.app.commands.evaluate, saferclip.app.commands.export\n"
        "import saferclip.model.build, saferclip.export.open_clip\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
        "import wandb  # still importable when someone asks for it\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
