"""saferclip-export and the export that ends training: from a real (tiny) training run to a
folder plain open_clip loads, with the same embeddings as the trained LoRA model."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from saferclip.app.commands.export import main as export_main
from saferclip.errors import ConfigError
from saferclip.export.open_clip import CONFIG_NAME, WEIGHTS_NAME
from saferclip.export.run import export_checkpoint
from saferclip.export.run_records import read_run_config
from saferclip.model.adapters import LoRADelta
from saferclip.model.build import build_clip
from saferclip.model.checkpoints import load_state_dict, save_state_dict

ARCH = "saferclip-micro"
CAPTIONS = ["a red square on a blue background", "a small green circle with a knife"]
# fp32 tolerance on L2-normalised embeddings: merging W + s*B@A changes the rounding of the
# weights, nothing else (observed here: 0, bit-identical)
TOL_FP32 = 1e-5


# ---------------------------------------------------------------- a real training run


def compose_train(run_dir: Path, toy_world: Path, cache_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR

    base = [
        "model=micro",
        f"paths.toy_dir={toy_world}",
        "data.toy_size=small",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        f"paths.run_dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={run_dir.parent / 'out'}",
        "trainer.accelerator=cpu",
        "++trainer.enable_progress_bar=false",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=4",
        "++trainer.limit_val_batches=1",
        "logger=csv",
        # a large lr, so the adapters move well beyond the tolerance in a few steps
        "method.optimizer.lr=0.02",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def trained(toy_world: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One short training run (micro model, small toy world) with ``export=true``. Read-only:
    tests that change the run folder copy it."""
    from saferclip.app.engine.fit import train

    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    cfg = compose_train(run_dir, toy_world, tmp / "cache", "export=true")
    result = train(cfg)
    best = Path(result["best_checkpoint"])
    image = sorted((toy_world / "visu" / "train2017").glob("*.png"))[0]
    return SimpleNamespace(run_dir=run_dir, result=result, best=best, image=image)


@pytest.fixture(scope="module")
def trained_module(trained):
    """The Lightning module of the best checkpoint: LoRA parametrizations active, unmerged."""
    from saferclip.app.engine.module import SaferClipModule

    module = SaferClipModule.from_checkpoint(trained.best)
    module.eval()
    assert any(parametrize.is_parametrized(m) for m in module.model.modules())
    return module


@torch.no_grad()
def embed(model: nn.Module, preprocess, tokenizer, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ``[2, D]`` and image ``[1, D]`` embeddings, L2-normalised."""
    model.eval()
    image = preprocess(Image.open(image_path).convert("RGB")).unsqueeze(0)
    return model.encode_text(tokenizer(CAPTIONS), normalize=True), model.encode_image(image, normalize=True)


@pytest.fixture(scope="module")
def reference(trained, trained_module) -> dict[str, torch.Tensor]:
    """The trained model's embeddings (LoRA active), with saferclip's preprocessing and
    tokenizer for the arch; and the base model's (adapters zeroed) to show the LoRA moved."""
    bundle = build_clip(ARCH)
    text, image = embed(trained_module.model, bundle.preprocess, bundle.tokenizer, trained.image)
    base = copy.deepcopy(trained_module.model)
    for m in base.modules():
        if isinstance(m, LoRADelta):
            nn.init.zeros_(m.lora_B)
    base_text, base_image = embed(base, bundle.preprocess, bundle.tokenizer, trained.image)
    return {"text": text, "image": image, "base_text": base_text, "base_image": base_image, "image_path": trained.image}


def load_export(folder: Path, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The export as plain open_clip loads it (its own preprocessing and tokenizer)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return embed(model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}"), image_path)


def assert_same_embeddings(folder: Path, reference: dict[str, torch.Tensor], tol: float = TOL_FP32) -> None:
    text, image = load_export(folder, reference["image_path"])
    assert (text - reference["text"]).abs().max() < tol
    assert (image - reference["image"]).abs().max() < tol


def same_weights(a: Path, b: Path) -> bool:
    """Equal tensors (not bytes: safetensors writes its metadata entries in no fixed order)."""
    wa, wb = load_state_dict(a), load_state_dict(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def card(folder: Path) -> str:
    return (folder / "README.md").read_text()


def assert_no_local_paths(folder: Path, *roots: Path) -> None:
    """Nothing a user would publish (card, configs, provenance) holds an absolute local path."""
    from saferclip import locations

    for path in folder.iterdir():
        if path.suffix in (".md", ".json") and path.name not in ("vocab.json", "tokenizer.json"):
            text = path.read_text()
            for root in (*roots, locations.PACKAGE_DIR.parent, locations.home(), Path.home()):
                assert str(root) not in text, (path.name, str(root))


# ---------------------------------------------------------------- the export training writes


def test_training_writes_an_export_that_loads_with_the_trained_embeddings(trained, reference):
    out = trained.run_dir / "export"
    assert trained.result["export"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    info = json.loads((out / CONFIG_NAME).read_text())["saferclip"]
    # fit to publish: the checkpoint relative to the run, the run by its folder's name
    assert info["training_checkpoint"] == f"checkpoints/{trained.best.name}" and info["run"] == trained.run_dir.name
    assert info["method"] == "saferclip" and info["arch"] == ARCH and info["merged_adapters"] > 0
    # the LoRA really moved: the trained model is far (> 100x the tolerance) from its base ...
    assert (reference["text"] - reference["base_text"]).abs().max() > 100 * TOL_FP32
    assert (reference["image"] - reference["base_image"]).abs().max() > 100 * TOL_FP32
    # ... and the export, plain open_clip with merged weights, equals the LoRA model (text and image)
    assert_same_embeddings(out, reference)
    text = card(out)
    assert "SafeR-CLIP" in text and f"`{ARCH}`" in text and "random initialisation" in text
    # training wrote its resolved config: the card names the training data (by file name: the
    # toy world lives outside the run and the repository here)
    assert "`…/train.json`" in text
    assert_no_local_paths(out, trained.run_dir.parent.parent)  # the pytest tmp root: run and toy world


def test_export_of_the_in_memory_module(trained, trained_module, reference, tmp_path):
    """train.py passes the module itself when there is no best checkpoint."""
    out = export_checkpoint(trained_module, tmp_path / "m", method=trained_module.hparams["method"], arch=ARCH)
    assert_same_embeddings(out, reference)
    info = json.loads((out / CONFIG_NAME).read_text())["saferclip"]
    assert info["source"] == "in-memory SaferClipModule" and info["training_checkpoint"] is None
    # the module is left as it trained: adapters still there, unmerged
    assert any(parametrize.is_parametrized(m) for m in trained_module.model.modules())
    assert "SafeR-CLIP" in card(out)
    with pytest.raises(ValueError, match="holds a saferclip-micro model, but ViT-B-32"):
        export_checkpoint(trained_module, tmp_path / "other", arch="ViT-B-32")


# ---------------------------------------------------------------- the CLI


def test_cli_exports_a_run_folder(trained, reference, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export_main([str(trained.run_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {trained.run_dir} (checkpoints/{trained.best.name})" in printed and WEIGHTS_NAME in printed
    snippet = [line.strip() for line in printed.splitlines() if "open_clip" in line and "import" not in line]
    assert f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")' in snippet
    assert f'tokenizer = open_clip.get_tokenizer("local-dir:{out}")' in snippet
    assert_same_embeddings(out, reference)
    text = card(out)
    assert "SafeR-CLIP" in text and "Base model:** none (random initialisation)" in text
    assert "### Method configuration" in text and "live_relative_text: 0.5" in text
    assert "No evaluation results were attached" in text  # this run has no report
    # a checkpoint file works as well as the run folder
    assert export_main([str(trained.best), str(tmp_path / "from_ckpt")]) == 0
    assert same_weights(tmp_path / "from_ckpt" / WEIGHTS_NAME, out / WEIGHTS_NAME)


@pytest.mark.slow
def test_exported_folder_loads_with_open_clip_alone(trained, reference, tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.modules["saferclip"] = None  # any import of saferclip now fails
        import open_clip, torch
        from PIL import Image
        folder, image_path, out_path = sys.argv[1:4]
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
        tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
        model.eval()
        with torch.no_grad():
            text = model.encode_text(tokenizer(CAPTIONS), normalize=True)
            image = model.encode_image(preprocess(Image.open(image_path).convert("RGB")).unsqueeze(0), normalize=True)
        torch.save({"text": text, "image": image}, out_path)
        assert not [m for m in sys.modules if m.startswith("saferclip.")]
        print("ok")
        """
    ).replace("CAPTIONS", repr(CAPTIONS))
    out = tmp_path / "emb.pt"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(trained.run_dir / "export"), str(trained.image), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    got = torch.load(out, weights_only=True)
    assert (got["text"] - reference["text"]).abs().max() < TOL_FP32
    assert (got["image"] - reference["image"]).abs().max() < TOL_FP32


def test_cli_never_replaces_an_existing_folder_without_force(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(trained.best), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # an earlier export is kept byte for byte, then replaced with --force
    shutil.rmtree(out)
    shutil.copytree(trained.run_dir / "export", out)
    (out / WEIGHTS_NAME).write_bytes(b"an older export")
    assert export_main([str(trained.run_dir), str(out)]) == 2
    assert (out / WEIGHTS_NAME).read_bytes() == b"an older export"
    assert export_main([str(trained.run_dir), str(out), "--force"]) == 0
    assert same_weights(out / WEIGHTS_NAME, trained.run_dir / "export" / WEIGHTS_NAME)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp leftovers

    # not even with --force when the folder holds the run itself
    capsys.readouterr()
    run_copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_copy, ignore=shutil.ignore_patterns("export"))
    assert export_main([str(run_copy), str(run_copy), "--force"]) == 2
    assert "holds the training run" in capsys.readouterr().err
    assert (run_copy / "checkpoints" / trained.best.name).is_file()


def _bad_sources(trained, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source, what the one-line error must say)."""
    data = trained.best.read_bytes()
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    png = tmp / "photo.ckpt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    pickled = tmp / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"when": __import__("datetime").date(2024, 1, 1)}}, pickled)
    plain = tmp / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    weights = tmp / "weights.safetensors"
    save_state_dict({"w": torch.zeros(2)}, weights)
    empty_run = tmp / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    return {
        "missing": (tmp / "nope.ckpt", "no such training checkpoint"),
        "no checkpoints": (empty_run, "no checkpoints/*.ckpt"),
        "truncated": (truncated, "truncated"),
        "foreign": (png, "a PNG image"),
        "pickle": (pickled, "needs pickle to load"),
        "plain weights": (plain, "not a saferclip training checkpoint"),
        "safetensors": (weights, "a safetensors file, not a torch checkpoint"),
        "an export": (trained.run_dir / "export", "already an exported open_clip folder"),
    }


def test_cli_refuses_bad_sources_in_one_line(trained, tmp_path, capsys):
    for name, (source, message) in _bad_sources(trained, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        assert export_main([str(source), str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("saferclip-export: error: ") and "\n" not in err, (name, err)
        assert message in err and str(source) in err, (name, err)
        assert not out.exists(), name


@pytest.mark.slow  # the in-process tests above cover the messages; this is the real entry point
def test_cli_error_in_a_subprocess_is_one_line_and_exit_code_2(trained, tmp_path):
    data = trained.best.read_bytes()
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(data[: len(data) // 3])
    proc = subprocess.run(
        [sys.executable, "-m", "saferclip.app.commands.export", str(truncated), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "truncated" in proc.stderr


def test_fp16_single_file_export(trained, reference, tmp_path):
    out = tmp_path / "m16"
    assert export_main([str(trained.best), str(out), "--dtype", "fp16", "--single-file"]) == 0
    assert all(t.dtype == torch.float16 for t in load_state_dict(out / WEIGHTS_NAME).values())
    assert (out / f"{ARCH}-saferclip.safetensors").is_file() and (out / f"{ARCH}.json").is_file()
    text, image = load_export(out, trained.image)
    # tolerance 1e-2: fp16 keeps ~3 significant digits of each weight
    assert (text - reference["text"]).abs().max() < 1e-2 and (image - reference["image"]).abs().max() < 1e-2


# ---------------------------------------------------------------- the model card's sources


def _fake_results() -> dict:
    return {
        "meta": {"split": "test", "seed": 0, "suites": ["visu", "cost"], "reference": "original", "created": "now"},
        "models": {"original": {"arch": ARCH, "source": "base"}, "trained": {"arch": ARCH, "source": "run"}},
        "data": {"visu": {"path": "/data/visu/test.json", "split": "test", "num_items": 24, "mode": "full"}},
        "results": {
            "original": {"visu": {"U2V_R@1": 0.125, "S2V_R@1": 0.5}},
            "trained": {"visu": {"U2V_R@1": 0.375, "S2V_R@1": 0.4583}, "cost": {"visu_S2V_R@1_retention": 0.9166}},
        },
    }


def test_card_takes_the_runs_evaluation_report(trained, tmp_path, capsys):
    from saferclip.evaluation import report

    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export"))
    report.write_report(_fake_results(), run / "report")
    assert export_main([str(run), str(tmp_path / "a")]) == 0
    text = card(tmp_path / "a")
    assert "| U2V_R@1 | 12.5 | 37.5 |" in text  # the report's table, one column per model
    assert "visu_S2V_R@1_retention | – | 91.7 |" not in text  # cost goes to its own section
    over = text.split("### Over-defensiveness", 1)[1].split("## Usage", 1)[0]
    assert "visu_S2V_R@1_retention | 91.7 |" in over
    # the evaluation data by file name and the report relative to the run: never a local path
    assert "visu `…/test.json`" in text
    assert "/data/visu" not in text and "split `test`" in text and "full report: `report/results.json`" in text
    assert_no_local_paths(tmp_path / "a", tmp_path)
    # a damaged report found in the run does not fail the export (training ends with one)
    (run / "report" / "results.json").write_text("{not json")
    assert export_main([str(run), str(tmp_path / "d")]) == 0
    assert "No evaluation results were attached" in card(tmp_path / "d")

    # --eval-report names one explicitly (here a Markdown report in another folder)
    other = tmp_path / "eval"
    other.mkdir()
    (other / "results.md").write_text(
        "# saferclip evaluation\n\n## Results\n\n| metric | m |\n|---|---:|\n| U2V_R@1 | 99.0 |\n\n## Plots\n"
    )
    assert export_main([str(trained.run_dir), str(tmp_path / "b"), "--eval-report", str(other)]) == 0
    text = card(tmp_path / "b")
    assert "| U2V_R@1 | 99.0 |" in text and "## Plots" not in text
    capsys.readouterr()
    assert export_main([str(trained.run_dir), str(tmp_path / "c"), "--eval-report", str(tmp_path / "none")]) == 2
    assert "no such evaluation report" in capsys.readouterr().err


RUN_CONFIG_WITH_REFERENCES = """
paths:
  home: ${saferclip_home:}
  data_dir: ${paths.home}/data
  toy_dir: /worlds/toy
  run_dir: ${hydra:runtime.output_dir}
data:
  name: toy
  toy_size: small
  root: ${paths.toy_dir}
  batch_size: 128
  splits:
    train: {path: "${data.root}/visu/train.json", image_root: "${data.root}/visu"}
  cache: ${paths.data_dir}/cache
  size: ${data.batch_size}
other:
  odd: ${unknown_resolver:x}/y
seed: 3
"""


def test_run_config_left_unresolved_is_resolved_section_by_section(tmp_path, monkeypatch, caplog):
    """A config_resolved.yaml that training wrote unresolved (a value failed to resolve): each
    section resolves with saferclip's resolvers; one that cannot here is kept as written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config_resolved.yaml").write_text(RUN_CONFIG_WITH_REFERENCES)
    monkeypatch.setenv("SAFERCLIP_HOME", str(tmp_path / "home"))
    cfg = read_run_config(run)

    assert cfg["data"]["splits"]["train"] == {"path": "/worlds/toy/visu/train.json", "image_root": "/worlds/toy/visu"}
    assert cfg["data"]["cache"] == f"{tmp_path / 'home'}/data/cache"
    assert cfg["data"]["size"] == 128  # a lone reference keeps its type
    assert cfg["paths"]["run_dir"] == "${hydra:runtime.output_dir}"  # Hydra's runtime: not here
    assert cfg["other"]["odd"] == "${unknown_resolver:x}/y"  # left as written, not an error
    assert cfg["seed"] == 3
    assert "paths (" in caplog.text and "other (" in caplog.text


def test_run_with_only_hydras_config_says_how_to_export_it(trained, tmp_path, capsys):
    """A run from before config_resolved.yaml: one line saying what to do, exit code 2; done, it exports."""
    run = tmp_path / "old-run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export", "config_resolved.yaml"))
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text(RUN_CONFIG_WITH_REFERENCES)
    with pytest.raises(ConfigError, match="no config_resolved.yaml"):
        read_run_config(run)
    assert export_main([str(run), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "no config_resolved.yaml" in err
        and f"cp {run / '.hydra' / 'config.yaml'} {run / 'config_resolved.yaml'}" in err
    )
    assert "\n" not in err

    shutil.copy(run / ".hydra" / "config.yaml", run / "config_resolved.yaml")
    assert export_main([str(run), str(tmp_path / "a")]) == 0
    assert "- **train** (training): `…/train.json`, images under `…/visu`" in card(tmp_path / "a")  # resolved


# ---------------------------------------------------------------- --format hf (transformers)


def test_cli_exports_a_transformers_folder_with_a_publishable_card(trained, reference, tmp_path, capsys):
    """The trained LoRA model as a transformers CLIPModel: same embeddings; a card that names the
    base model, the run and the exported epoch with its validation figures, and the report's
    table, without one local path."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: the downstream extra (pip install -e '.[downstream]')"
    )
    from saferclip.evaluation import report

    run = tmp_path / "my-run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export"))
    report.write_report(_fake_results(), run / "report")
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "hf"]) == 0
    printed = capsys.readouterr().out
    assert "(transformers CLIPModel)" in printed and f'CLIPModel.from_pretrained("{out}")' in printed

    model = transformers.CLIPModel.from_pretrained(out).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out)
    processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(CAPTIONS, padding=True, return_tensors="pt"))
        pixels = processor(images=Image.open(reference["image_path"]).convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        image = model.get_image_features(pixel_values=pixels)
    text, image = (x if torch.is_tensor(x) else x.pooler_output for x in (text, image))
    assert (torch.nn.functional.normalize(text, dim=-1) - reference["text"]).abs().max() < TOL_FP32
    assert (torch.nn.functional.normalize(image, dim=-1) - reference["image"]).abs().max() < TOL_FP32

    text = card(out)
    assert "library_name: transformers" in text and "CLIPModel.from_pretrained" in text
    assert "Base model:** none (random initialisation)" in text and "SafeR-CLIP" in text
    assert "of run `my-run`" in text and f"`{trained.best.name}`" in text
    assert "## Model selection" in text and "Exported: epoch 0" in text and "Its validation figures" in text
    assert "| U2V_R@1 | 12.5 | 37.5 |" in text and "full report: `report/results.json`" in text
    info = json.loads((out / "saferclip.json").read_text())
    assert info["run"] == "my-run" and info["training_checkpoint"] == f"checkpoints/{trained.best.name}"
    assert info["selection"]["epoch"] == 0 and info["format"] == "transformers"
    assert_no_local_paths(out, tmp_path, trained.run_dir.parent.parent)
    assert_no_local_paths(trained.run_dir / "export", trained.run_dir.parent.parent)  # the open_clip one too

    # what the transformers layout cannot do: one line, exit code 2
    capsys.readouterr()
    assert export_main([str(run), str(tmp_path / "x"), "--format", "hf", "--single-file"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saferclip-export: error:") and "open_clip layout option" in err and "\n" not in err
