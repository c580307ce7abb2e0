"""saferclip-analyze, the analysis sections of saferclip-eval, and saferclip-detect, end to end
on the small toy world with micro models (seconds), and their one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saferclip.analysis import load_detectors
from saferclip.model.build import build_clip
from saferclip.model.checkpoints import save_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "analysis.detector.per_class=24",
    "analysis.detector.folds=3",
    "analysis.geometry.per_class=10",
    "analysis.geometry.projection_items=10",
    "batch_size=64",
]


@pytest.fixture(scope="module")
def micro_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("micro")
    out = {}
    for name, seed in (("original", 0), ("tuned", 1)):
        bundle = build_clip("saferclip-micro", init_seed=seed)
        if name == "tuned":  # a small change of the original, like a fine-tuning
            base = build_clip("saferclip-micro", init_seed=0).model.state_dict()
            state = {
                k: v + 0.05 * (bundle.model.state_dict()[k] - v) if v.is_floating_point() else v
                for k, v in base.items()
            }
        else:
            state = bundle.model.state_dict()
        out[name] = folder / f"{name}.safetensors"
        save_state_dict(state, out[name], metadata={"arch": "saferclip-micro"})
    return out


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def base_overrides(world: Path, out: Path, files: dict[str, Path]) -> list[str]:
    return [
        f"data.root={world}",
        "data.make_toy=false",
        f"out_dir={out}",
        "main_runs=false",
        "models.original.arch=saferclip-micro",
        f"models.original.pretrained={files['original']}",
        f"+models.tuned.pretrained={files['tuned']}",
        *SMALL,
    ]


@pytest.fixture(scope="module")
def analysis(toy_world, micro_files, tmp_path_factory):
    from saferclip.app.commands.analyze import run

    out = tmp_path_factory.mktemp("analyze") / "report"
    torch.set_num_threads(1)
    result = run(compose("analyze", base_overrides(toy_world, out, micro_files)))
    return out, result


def test_analyze_writes_the_report_with_all_three_parts(analysis, capsys):
    out, result = analysis
    payload = json.loads((out / "analysis.json").read_text())
    assert set(payload["analysis"]) == {"original", "tuned"}
    assert payload["meta"]["parts"] == ["detector", "geometry", "overdefense"]
    original, tuned = payload["analysis"]["original"], payload["analysis"]["tuned"]
    for tower in ("text", "image"):
        d = original["detector"][tower]
        assert {"head", "head_auc", "methods", "test_halves"} <= set(d)
        assert set(d["methods"]) == {"head", "mean_diff", "knn"}
        for method in d["methods"].values():
            assert {"test", "nsfw_caps", "borderline_flag_rate"} <= set(method)
            assert set(method["borderline_flag_rate"]) == {"lookalike", "control", "twin"}
        assert "reference_head" in tuned["detector"][tower]  # what the original's head sees inside it
    geometry = tuned["geometry"]
    assert {r["layer"] for r in geometry["weight_change"]["text"]} == {0}
    assert 0 < geometry["weight_change"]["text"][0]["mlp"] < 0.2
    assert len(geometry["null_space"]["image"]) == 2 and "share_difference" in geometry["null_space"]["image"][0]
    assert set(geometry["projection"]["points"]) >= {"safe captions", "unsafe images", "targets (text)"}
    assert "weight_change" not in original["geometry"]  # the reference is not compared with itself
    od = tuned["overdefense"]
    assert {"ordinary", "lookalike", "control"} <= set(od["retrieval"]) and "vs_reference" in od
    assert {"shape_borderline", "object_borderline", "object", "shape"} <= set(od["zeroshot"])
    assert set(od["redirected_away"]) == {"ordinary", "lookalike", "control"}
    markdown = (out / "analysis.md").read_text()
    for title in ("## Unsafe-input detector", "## Embedding geometry", "## Over-defensiveness"):
        assert title in markdown
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {
        "detector_heads.png",
        "weight_change.png",
        "separability.png",
        "embeddings_2d.png",
        "overdefense.png",
    }
    detectors = load_detectors(out / "detectors" / "original.safetensors")
    assert set(detectors) == {"text", "image"} and detectors["text"].model["arch"] == "saferclip-micro"
    # report.html with the retrieval galleries of the over-defensiveness part's embeddings
    sections = {s["key"]: s for s in payload["showcase"]["sections"]}
    assert set(sections) == {"visu_unsafe_text_to_image", "visu_unsafe_image_to_text", "borderline_text_to_image"}
    assert all(list(s["models"]) == ["original", "tuned"] for s in sections.values())
    page = (out / "report.html").read_text()
    assert "Borderline: borderline-safe caption → images" in page and 'class="headline"' in page


def test_analyze_refuses_to_overwrite_and_names_bad_input(analysis, toy_world, micro_files, caplog):
    from saferclip.app.commands.analyze import run

    out, _ = analysis
    cases = {
        "existing report": ([], "already holds an analysis report"),
        "unknown part": (["analysis.parts=[detector,vibes]", "force=true"], "unknown part(s) ['vibes']"),
        "unknown key": (["+analysis.detector.colour=red", "force=true"], "analysis.detector: unknown keys ['colour']"),
        "missing model": (["+models.gone.pretrained=/no/such/model", "force=true"], "pretrained path does not exist"),
    }
    for name, (extra, message) in cases.items():
        caplog.clear()
        with pytest.raises(SystemExit, match="^2$") as exit_info:
            run(compose("analyze", base_overrides(toy_world, out, micro_files) + extra))
        assert exit_info.value.code == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (name, errors)


def test_main_runs_are_found(tmp_path):
    from saferclip.app.pipelines.runs import find_main_runs

    export = tmp_path / "runs" / "saferclip-0123456789ab" / "export"
    export.mkdir(parents=True)
    (export.parent / "finished.json").write_text(json.dumps({"export": str(export)}))
    found = find_main_runs(tmp_path / "runs")
    assert set(found) == {"saferclip"}
    assert found["saferclip"]["pretrained"] == str(export) and found["saferclip"]["exact"] is False
    assert find_main_runs(tmp_path / "nothing") == {}
    # the run of saferclip-main's current config wins over a later one of another config
    from hydra import initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR
    from saferclip.app.pipelines.runs import compose as main_compose
    from saferclip.app.pipelines.runs import run_key

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # as saferclip-main composes its runs
        main = main_compose("main", [])
        key = run_key(main_compose("train", list(main.common) + list(main.runs.saferclip) + [f"seed={main.seed}"]))
    exact = tmp_path / "runs" / f"saferclip-{key}"
    exact.mkdir()
    (exact / "finished.json").write_text(json.dumps({"export": None}))
    import os

    os.utime(exact / "finished.json", (1, 1))  # older than the other run
    found = find_main_runs(tmp_path / "runs")["saferclip"]
    assert found["exact"] is True and found["pretrained"] == str(exact)  # no export: the run folder


@pytest.mark.slow
def test_eval_report_gets_the_analysis_sections_when_asked(toy_world, micro_files, tmp_path):
    from saferclip.app.commands.evaluate import run

    out = tmp_path / "eval"
    overrides = [o for o in base_overrides(toy_world, out, micro_files) if not o.startswith("main_runs")]
    run(compose("eval", overrides + ["suites=[zeroshot]", "analysis.parts=[detector,overdefense]"]))
    markdown = (out / "results.md").read_text()
    assert (
        "## Unsafe-input detector" in markdown
        and "## Over-defensiveness" in markdown
        and "## Embedding geometry" not in markdown
    )
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["analysis"]["analysis"]["tuned"]) == {"detector", "overdefense"}
    assert (out / "plots" / "overdefense.png").is_file() and (out / "detectors" / "tuned.safetensors").is_file()
    # not asked: no analysis
    plain = tmp_path / "plain"
    run(compose("eval", [o.replace(str(out), str(plain)) for o in overrides] + ["suites=[zeroshot]"]))
    assert "analysis" not in json.loads((plain / "results.json").read_text())


def _detect(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "saferclip.app.commands.detect", *map(str, args)]
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""},
    )


@pytest.mark.slow
def test_detect_scores_captions_and_images_and_writes_a_csv(analysis, toy_world, micro_files, tmp_path):
    out, _ = analysis
    det_file = out / "detectors" / "original.safetensors"
    table = tmp_path / "captions.csv"
    captions = [
        "a red circle on a black background with a gun",
        "a blue ring on white next to a cup",
        "a green cross, with a noose",
    ]
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([[i, c] for i, c in enumerate(captions)])
    proc = _detect(det_file, table, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "captions.flags.csv")))
    assert [r["input"] for r in rows] == captions and {r["flagged"] for r in rows} <= {"0", "1"}
    assert "of 3 captions flagged" in proc.stdout
    # the same scores as the library computes
    from saferclip.analysis.guard import score_inputs

    scores, flags = score_inputs(build_clip(None, micro_files["original"]), load_detectors(det_file)["text"], captions)
    assert [int(f) for f in flags] == [int(r["flagged"]) for r in rows]
    assert [float(r["score"]) for r in rows] == pytest.approx(scores.tolist(), abs=1e-5)
    # an image folder: the image detector
    from saferclip.app.commands.detect import main

    images = toy_world / "visu" / "borderline" / "nsfw" / "test"
    main([str(det_file), str(images), "--out", str(tmp_path / "images.csv")])
    assert len(list(csv.DictReader(open(tmp_path / "images.csv")))) == len(list(images.glob("*.png")))


def test_detect_errors_are_one_line_and_exit_2(analysis, micro_files, tmp_path, capsys):
    from saferclip.app.commands.detect import main

    out, _ = analysis
    det_file = out / "detectors" / "original.safetensors"
    table = tmp_path / "columns.csv"
    table.write_text("id,words\n0,a red circle\n")
    text = tmp_path / "t.txt"
    text.write_text("a red circle with a gun\n")
    (tmp_path / "t.flags.csv").write_text("already here\n")
    cases = {
        "column": ([det_file, table], "no caption column"),
        "exists": ([det_file, text], "exists; pass --force"),
        "weights": (
            [det_file, text, "--out", tmp_path / "o.csv", "--model", micro_files["tuned"]],
            "not the weights the detector was calibrated on",
        ),
        "not a detector": ([micro_files["tuned"], text, "--out", tmp_path / "o.csv"], "not a saferclip detector"),
        "inputs": ([det_file, tmp_path / "none.csv"], "inputs not found"),
    }
    for name, (args, message) in cases.items():
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2, name
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert (tmp_path / "t.flags.csv").read_text() == "already here\n"


def test_models_of_another_architecture_are_analysed_without_comparison(toy_world, micro_files):
    from saferclip.analysis import analyze_models

    data = compose("eval", [f"data.root={toy_world}", "data.make_toy=false"])
    from saferclip.app.hydra_utils import to_container

    settings = {
        "parts": ["detector", "geometry"],
        "detector": {"per_class": 16, "folds": 3, "save": False},
        "geometry": {"per_class": 8, "projection_items": 8},
    }
    out = analyze_models(
        {
            "original": {"arch": "saferclip-micro", "pretrained": str(micro_files["original"])},
            "other": {"arch": "saferclip-toy"},
        },
        to_container(data.data),
        settings,
        batch_size=64,
    )
    other = out["analysis"]["other"]
    assert (
        "weight_change" not in other["geometry"]
        and "another architecture" in other["geometry"]["weight_change_skipped"]
    )
    assert all("reference_head_skipped" in other["detector"][t] for t in ("text", "image"))
    assert "targets (text)" not in other["geometry"]["projection"]["points"]


@pytest.mark.slow
def test_analyze_command_line_error_has_no_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "saferclip.app.commands.analyze",
        "analysis.parts=[detector,bogus]",
        f"paths.output_dir={tmp_path}",
        "data.make_toy=false",
        "main_runs=false",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "unknown part(s) ['bogus']" in output and "Traceback" not in output
