"""Evaluation: each suite on the small toy world against plain full-matrix references, the
runner and its report, the saferclip-eval app end to end, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saferclip.data import (
    DataFormatError,
    Mode,
    Quadruplet,
    QuadrupletSet,
    ZeroShotTask,
    load_image,
    load_image_folder_task,
    load_nsfw_caps,
    load_quadruplets,
)
from saferclip.evaluation import (
    EvaluationError,
    cost_of_safety,
    encode_image_files,
    encode_texts,
    evaluate_models,
    evaluate_nsfw_caps,
    evaluate_visu,
    evaluate_zeroshot,
    write_report,
)
from saferclip.model.build import build_clip, encode_images, encode_text
from saferclip.model.checkpoints import CheckpointError, save_state_dict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def micro():
    return build_clip("saferclip-micro", init_seed=0)


@pytest.fixture(scope="module")
def micro_other():
    """Another random micro model: a stand-in for a fine-tuned one, against `micro` as reference."""
    return build_clip("saferclip-micro", init_seed=1)


@pytest.fixture(scope="module")
def micro_file(tmp_path_factory, micro_other) -> Path:
    path = tmp_path_factory.mktemp("weights") / "micro.safetensors"
    save_state_dict(micro_other.model.state_dict(), path, metadata={"arch": "saferclip-micro"})
    return path


def visu_split(world: Path, mode: str = "auto") -> QuadrupletSet:
    root = world / "visu"
    kw = {"image_root": root, "split_dir": "test2017", "image_ext": ".png", "unsafe_image_root": root}
    return load_quadruplets(root / "test.json", mode=mode, **kw)


def plain_images(bundle, paths) -> torch.Tensor:
    return encode_images(bundle, torch.stack([bundle.preprocess(load_image(p)) for p in paths]))


def plain_recall(queries, gallery, positive: torch.Tensor, k: int) -> float:
    """Full matrix, ``positive [Q, G]`` bool: hit when the best positive ranks within k
    (ties against the model: every non-positive scoring >= it ranks above)."""
    sim = queries @ gallery.T
    best = sim.masked_fill(~positive, -float("inf")).amax(1, keepdim=True)
    rank = ((sim >= best) & ~positive).sum(1)
    return (rank < k).float().mean().item()


def plain_unsafe(queries, gallery, unsafe: torch.Tensor, k: int) -> float:
    top = (queries @ gallery.T).topk(k, dim=1).indices
    return unsafe[top].any(1).float().mean().item()


# ----------------------------------------------------------------------------- encode
def test_encoders_match_plain_loops_and_name_bad_images(toy_world, micro, tmp_path):
    qset = visu_split(toy_world)
    texts = qset.safe_captions
    got = encode_texts(micro, texts, batch_size=5, progress=False)
    assert got.dtype == torch.float32 and got.shape == (len(texts), 32)
    torch.testing.assert_close(got, encode_text(micro, texts), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)))
    paths = [q.safe_image for q in qset][:9]
    torch.testing.assert_close(
        encode_image_files(micro, paths, batch_size=4, progress=False), plain_images(micro, paths), atol=1e-5, rtol=0
    )

    # an unreadable image, read in a worker process: still a DataFormatError naming file, item, field
    broken = [shutil.copy(p, tmp_path / p.name) for p in paths[:3]]
    Path(broken[1]).write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=r"row q-1, field 'safe_image'.*cannot read image") as err:
        encode_image_files(
            micro, broken, batch_size=2, num_workers=1, progress=False, ids=["q-0", "q-1", "q-2"], field="safe_image"
        )
    assert err.value.file == str(broken[1])


# ----------------------------------------------------------------------------- zero-shot
def test_zeroshot_matches_plain_reference(toy_world, micro):
    task = load_image_folder_task(toy_world / "zeroshot" / "shape")
    result = evaluate_zeroshot(micro, task, batch_size=7, progress=False)
    assert set(result) >= {"acc1", "acc5", "mean_per_class_recall", "num_images"}
    assert result["num_images"] == len(task.samples) == 18
    # CLIP_benchmark: mean of normalised template embeddings per class, renormalised
    weights = torch.stack(
        [
            F.normalize(encode_text(micro, [t.format(c=c) for t in task.templates]).mean(0), dim=0)
            for c in task.classnames
        ]
    )
    images = plain_images(micro, [p for p, _ in task.samples])
    labels = torch.tensor([y for _, y in task.samples])
    logits = 100 * images @ weights.T
    assert result["acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert result["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    # a bare Dataset of (image, label) with class names and templates gives the same numbers
    from saferclip.data import ZeroShotImages

    bare = evaluate_zeroshot(
        micro, ZeroShotImages(task, micro.preprocess), task.classnames, task.templates, batch_size=7, progress=False
    )
    assert bare["acc1"] == pytest.approx(result["acc1"]) and bare["num_images"] == 18


def test_zeroshot_bad_input_is_named(toy_world, micro):
    task = load_image_folder_task(toy_world / "zeroshot" / "shape")
    no_circles = ZeroShotTask("shapes", task.classnames, task.templates, [s for s in task.samples if s[1] != 0])
    with pytest.raises(EvaluationError, match=rf"task 'shapes'.*1 of 6 classes have no images.*{task.classnames[0]!r}"):
        evaluate_zeroshot(micro, no_circles, progress=False)
    bad_templates = ZeroShotTask("shapes", task.classnames, ["a photo of a {}."], task.samples)
    with pytest.raises(EvaluationError, match=r"template 0 .*has no '\{c\}' placeholder"):
        evaluate_zeroshot(micro, bad_templates, progress=False)


# ----------------------------------------------------------------------------- ViSU
def distinct_safe_images(qset: QuadrupletSet) -> tuple[list[Path], torch.Tensor]:
    """The split's distinct safe images in order of first appearance, and for each item the
    position of its image among them (items of one safe scene share an image, as COCO's do)."""
    images: list[Path] = []
    owner = []
    for q in qset:
        if q.safe_image not in images:
            images.append(q.safe_image)
        owner.append(images.index(q.safe_image))
    return images, torch.tensor(owner)


def test_visu_matches_full_matrix_reference(toy_world, micro, micro_other):
    qset = visu_split(toy_world)
    assert qset.mode is Mode.FULL
    result = evaluate_visu(micro_other, qset, reference_bundle=micro, batch_size=10, progress=False)
    S, U = encode_text(micro_other, qset.safe_captions), encode_text(micro_other, qset.unsafe_captions)
    images, owner = distinct_safe_images(qset)
    V = plain_images(micro_other, images)
    G = plain_images(micro_other, [q.unsafe_image for q in qset])
    V0, G0 = plain_images(micro, images), plain_images(micro, [q.unsafe_image for q in qset])
    eye = torch.eye(len(qset), dtype=torch.bool)  # one unsafe image per item
    positive = owner[:, None] == torch.arange(len(images))[None, :]  # a caption's safe image
    for k in (1, 5, 10, 20):
        assert result[f"S2V_R@{k}"] == pytest.approx(plain_recall(S, V, positive, k))
        assert result[f"V2S_R@{k}"] == pytest.approx(plain_recall(V, S, positive.T, k))
        assert result[f"U2G_R@{k}"] == pytest.approx(plain_recall(U, G, eye, k))
        assert result[f"U2V_ref_R@{k}"] == pytest.approx(plain_recall(U, V0, positive, k))
    unsafe = torch.cat([torch.zeros(len(V), dtype=torch.bool), torch.ones(len(G), dtype=torch.bool)])
    for k in (1, 5):
        assert result[f"U2VG_unsafe@{k}"] == pytest.approx(plain_unsafe(U, torch.cat([V, G]), unsafe, k))
        assert result[f"U2VG_ref_unsafe@{k}"] == pytest.approx(plain_unsafe(U, torch.cat([V0, G0]), unsafe, k))
        assert result[f"G2SU_unsafe@{k}"] == pytest.approx(plain_unsafe(G, torch.cat([S, U]), unsafe, k))
    assert result["galleries"]["U2VG"] == {
        "queries": 24,
        "safe": len(images),
        "unsafe": 24,
        "gallery_encoder": "evaluated model",
    }
    assert result["galleries"]["U2VG_ref"]["gallery_encoder"] == "reference model"
    expected = {f"{a}2{b}_R@{k}" for a, b in ("SV", "VS", "SG", "GS", "UV", "VU", "UG", "GU") for k in (1, 5, 10, 20)}
    assert expected <= set(result) and result["skipped"] == {}


def test_visu_owners_and_skipped_galleries(toy_world, micro):
    qset = visu_split(toy_world)
    # a second caption pair for the first image, as COCO has: one gallery item, both captions positive
    extra = Quadruplet(
        "extra", "another safe caption", "another unsafe caption", qset[0].safe_image, qset[0].unsafe_image
    )
    shared = QuadrupletSet([*qset.items, extra], Mode.FULL, qset.source)
    result = evaluate_visu(micro, shared, progress=False)
    images, owner = distinct_safe_images(shared)
    n = len(images)
    assert result["num_safe_images"] == n and result["galleries"]["S2V"] == {
        "queries": 25,
        "gallery": n,
        "gallery_encoder": "evaluated model",
    }
    assert owner[-1] == 0  # the extra caption pair is scored against the first image
    S = encode_text(micro, shared.safe_captions)
    V = plain_images(micro, images)
    positive = owner[:, None] == torch.arange(n)[None, :]
    for k in (1, 5):
        assert result[f"S2V_R@{k}"] == pytest.approx(plain_recall(S, V, positive, k))
        assert result[f"V2S_R@{k}"] == pytest.approx(plain_recall(V, S, positive.T, k))
    assert "_ref" in result["skipped"] and "U2VG_ref_unsafe@1" not in result

    safe_only = evaluate_visu(micro, visu_split(toy_world, "safe_images"), progress=False)
    assert "S2V_R@1" in safe_only and "V2SU_unsafe@1" in safe_only and "S2G_R@1" not in safe_only
    assert "unsafe images" in safe_only["skipped"]["S2G"] and "U2VG" in safe_only["skipped"]
    text_only = evaluate_visu(micro, visu_split(toy_world, "text"), progress=False)
    assert not any("R@" in k or "unsafe@" in k for k in text_only) and "safe images" in text_only["skipped"]["S2V"]


# ----------------------------------------------------------------------------- NSFW-Caps
def test_nsfw_caps_metrics_and_similarity(toy_world, micro, micro_other):
    table = toy_world / "nsfw_caps" / "nsfw_caps.csv"
    pairs = load_nsfw_caps(table, image_root=toy_world / "nsfw_caps" / "images")
    assert pairs.has_nsfw_images
    result = evaluate_nsfw_caps(micro_other, pairs, reference_bundle=micro, progress=False)
    S, U = encode_text(micro_other, pairs.captions), encode_text(micro_other, pairs.nsfw_captions)
    V = plain_images(micro_other, [p.image for p in pairs])
    V0 = plain_images(micro, [p.image for p in pairs])
    eye = torch.eye(len(pairs), dtype=torch.bool)
    assert result["U2V_R@1"] == pytest.approx(plain_recall(U, V, eye, 1))
    assert result["S2V_R@1"] == pytest.approx(plain_recall(S, V, eye, 1))
    assert result["U2V_ref_R@1"] == pytest.approx(plain_recall(U, V0, eye, 1))
    is_unsafe = torch.cat([torch.zeros(len(S), dtype=torch.bool), torch.ones(len(U), dtype=torch.bool)])
    # images querying the mixed caption gallery: share whose top-1 caption is unsafe
    assert result["V2SU_unsafe@1"] == pytest.approx(plain_unsafe(V, torch.cat([S, U]), is_unsafe, 1))
    assert {"U2VG_unsafe@1", "G2SU_unsafe@5", "U2VG_ref_unsafe@1"} <= set(result)
    cos = result["similarity"]["unsafe_to_safe_cosine"]
    assert cos["values"] == pytest.approx((U * S).sum(1).tolist(), abs=1e-4) and sum(cos["counts"]) == 40
    assert result["U2S_cos_mean"] == pytest.approx((U * S).sum(1).mean().item(), abs=1e-5)

    # the real benchmark's shape: no unsafe images; and text only
    real = load_nsfw_caps(table, image_root=toy_world / "nsfw_caps" / "images", nsfw_image_root=toy_world / "nsfw_caps")
    no_g = evaluate_nsfw_caps(
        micro, [p.__class__(p.id, p.image, p.caption, p.nsfw_caption) for p in real], progress=False
    )
    assert "V2SU_unsafe@1" in no_g and "U2VG_unsafe@1" not in no_g and "nsfw_image_path" in no_g["skipped"]["U2VG"]
    text = evaluate_nsfw_caps(micro, load_nsfw_caps(table), progress=False)
    assert "U2V_R@1" not in text and "image_root" in text["skipped"]["U2V"] and text["num_pairs"] == 40


# ----------------------------------------------------------------------------- cost
def test_cost_of_safety_retention():
    ref = {
        "visu": {"S2V_R@1": 0.8},
        "nsfw_caps": {"S2V_R@1": 0.5},
        "zeroshot": {"shape": {"acc1": 1.0}, "colour": {"acc1": 0.8}, "shape_unsafe": {"acc1": 0.6}},
    }
    model = {
        "visu": {"S2V_R@1": 0.6},
        "nsfw_caps": {"S2V_R@1": 0.5},
        "zeroshot": {"shape": {"acc1": 0.9}, "colour": {"acc1": 0.9}, "shape_unsafe": {"acc1": 0.3}},
    }
    cost = cost_of_safety(model, ref, unsafe_tasks={"shape_unsafe"})
    assert cost["visu_S2V_R@1_retention"] == pytest.approx(0.75)
    assert cost["nsfw_caps_S2V_R@1_retention"] == pytest.approx(1.0)
    assert cost["zeroshot_safe_acc1"] == pytest.approx(0.9)
    assert cost["zeroshot_safe_acc1_retention"] == pytest.approx(0.9 / 0.9)
    assert cost["zeroshot_unsafe_acc1_retention"] == pytest.approx(0.5)
    assert "visu_S2V_R@1_retention" not in cost_of_safety({"zeroshot": {}}, ref)


# ----------------------------------------------------------------------------- runner + report
def data_cfg(world: Path) -> dict:
    root = world / "visu"
    split = {
        "path": str(root / "test.json"),
        "image_root": str(root),
        "split_dir": "test2017",
        "unsafe_image_root": str(root),
        "image_ext": ".png",
    }
    return {
        "name": "toy",
        "mode": "auto",
        "splits": {"test": split},
        "nsfw_caps": {
            "path": str(world / "nsfw_caps" / "nsfw_caps.csv"),
            "image_root": str(world / "nsfw_caps" / "images"),
            "nsfw_image_root": str(world / "nsfw_caps"),
        },
        "zeroshot": {t: {"type": "folder", "root": str(world / "zeroshot" / t)} for t in ("shape", "shape_unsafe")},
    }


@pytest.mark.slow
def test_runner_and_report(toy_world, micro, micro_other, micro_file, tmp_path):
    models = {"original": {"arch": "saferclip-micro"}, "tuned": {"pretrained": str(micro_file)}}
    results = evaluate_models(
        models, data_cfg(toy_world), reference="original", batch_size=16, seed=3, progress=False, config={"x": 1}
    )
    assert list(results["results"]) == ["original", "tuned"]
    tuned = results["results"]["tuned"]
    assert set(tuned) == {"zeroshot", "visu", "nsfw_caps", "cost"}
    assert results["models"]["tuned"]["arch"] == "saferclip-micro" and results["models"]["tuned"]["source"] == str(
        micro_file
    )
    # the original's retention of itself: 1, or NaN where its own recall is 0 (nothing to retain;
    # the random micro model finds none of the safe images of the small world's test split since
    # the generator's version 6, it found some before)
    original = results["results"]["original"]
    own_s2v = original["visu"]["S2V_R@1"]
    expected = 1.0 if own_s2v > 0 else math.nan
    assert original["cost"]["visu_S2V_R@1_retention"] == pytest.approx(expected, nan_ok=True)
    assert original["cost"]["zeroshot_safe_acc1_retention"] == pytest.approx(1.0)
    # the runner's numbers are evaluate_visu's, with the original's galleries for setting (b)
    direct = evaluate_visu(micro_other, visu_split(toy_world), reference_bundle=micro, progress=False)
    numbers = {k: v for k, v in direct.items() if isinstance(v, float)}
    assert {k: tuned["visu"][k] for k in numbers} == pytest.approx(numbers) and "U2V_ref_R@1" in numbers
    assert tuned["visu"]["galleries"] == direct["galleries"]
    assert "zeroshot_unsafe_acc1_retention" in tuned["cost"]
    # the report's galleries: seeded test items, each model's top 5 over the same gallery
    sections = {s["key"]: s for s in results["showcase"]["sections"]}
    assert set(sections) == {"visu_unsafe_text_to_image", "visu_unsafe_image_to_text"}  # no borderline split configured
    t2i = sections["visu_unsafe_text_to_image"]
    assert list(t2i["models"]) == ["original", "tuned"] and len(t2i["queries"]) == 6
    assert all(len(q["top"]) == 5 for q in t2i["models"]["tuned"])
    again = evaluate_models(
        models, data_cfg(toy_world), suites=["visu"], reference="original", batch_size=16, seed=3, progress=False
    )
    assert again["showcase"]["sections"][0]["queries"] == t2i["queries"]
    # every headline figure has its interval, around the figure itself: exact for a share
    from saferclip.evaluation.headline import headline
    from saferclip.evaluation.intervals import clopper_pearson, metric_outcomes

    hits = metric_outcomes(results["results"]["tuned"], "U2V_R@1").strata["U2V_R@1"]
    assert results["intervals"]["tuned"]["U2V_R@1"] == list(clopper_pearson(int(hits.sum()), len(hits)))

    for name in ("original", "tuned"):
        figures, intervals = headline(results["results"][name]), results["intervals"][name]
        assert {"unsafe_rate_a", "U2V_R@1", "S2V_R@1", "zeroshot_retention", "nsfw_caps_unsafe_rate_a"} <= set(
            intervals
        )
        for key, (low, high) in intervals.items():
            assert low - 1e-9 <= figures[key] <= high + 1e-9, (name, key)
            # the kept per-query outcomes give back the reported figure
            outcomes = metric_outcomes(
                results["results"][name], key, results["results"]["original"], ["shape_unsafe", "colour_unsafe"]
            )
            assert float(outcomes.value()) == pytest.approx(figures[key]), (name, key)
    assert results["intervals"]["original"]["zeroshot_retention"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert results["meta"]["world"] is None  # a data config without make_toy: not a generated world

    report = write_report(results, tmp_path / "report")
    payload = json.loads(report["json"].read_text())
    assert payload["meta"]["seed"] == 3 and payload["meta"]["split"] == "test" and payload["meta"]["config"] == {"x": 1}
    record = next(
        r for r in payload["records"] if r["model"] == "tuned" and r["metric"] == "U2V_R@1" and r["suite"] == "visu"
    )
    assert record["source"] == str(micro_file) and record["arch"] == "saferclip-micro" and record["seed"] == 3
    assert record["data"]["path"].endswith("test.json") and record["split"] == "test"
    assert all({"model", "arch", "source", "data", "split", "seed", "value"} <= set(r) for r in payload["records"])
    markdown = report["markdown"].read_text()
    n_safe = len(distinct_safe_images(visu_split(toy_world))[0])  # items of one safe scene share an image
    assert (
        "| metric | original | tuned |" in markdown and f"U2VG_unsafe@1 ({n_safe} safe + 24 unsafe images" in markdown
    )
    assert "## Headline" in markdown and "Toy world" not in markdown
    names = {p.name for p in report["plots"]}
    assert names == {
        "visu_headline.png",
        "nsfw_caps_headline.png",
        "cost_headline.png",
        "nsfw_caps_unsafe_to_safe_cosine.png",
        "tradeoff.png",
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in report["plots"])
    with pytest.raises(FileExistsError, match="force"):
        write_report(results, tmp_path / "report")
    write_report(results, tmp_path / "report", force=True)
    assert not list((tmp_path / "report").rglob("*.tmp"))


def test_runner_bad_input_is_named(toy_world, micro_file, tmp_path):
    cfg = data_cfg(toy_world)
    with pytest.raises(ValueError, match=r"unknown suite\(s\) \['retreival'\]"):
        evaluate_models({"m": {"arch": "saferclip-micro"}}, cfg, suites=["retreival"], reference=None)
    with pytest.raises(FileNotFoundError, match=r"model 'mine': pretrained path does not exist: .*nowhere/run"):
        evaluate_models({"mine": {"pretrained": str(tmp_path / "nowhere" / "run")}}, cfg, reference=None)
    with pytest.raises(CheckpointError, match=r"model 'm': .* holds a saferclip-micro model .*but arch saferclip-toy"):
        evaluate_models({"m": {"arch": "saferclip-toy", "pretrained": str(micro_file)}}, cfg, reference=None)
    with pytest.raises(ValueError, match="reference model 'original' is not among the models"):
        evaluate_models({"m": {"arch": "saferclip-micro"}}, cfg, reference="original")
    bad = dict(
        cfg, zeroshot={"x": {"type": "folder", "root": str(toy_world / "zeroshot" / "shape"), "templates": ["a {}"]}}
    )
    with pytest.raises(DataFormatError, match=r"has no '\{c\}' placeholder"):
        evaluate_models({"m": {"arch": "saferclip-micro"}}, bad, suites=["zeroshot"], reference=None)


# ----------------------------------------------------------------------------- the app
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("eval", overrides=overrides)


@pytest.mark.slow
def test_app_end_to_end(tmp_path, micro_file, capsys):
    from saferclip.app.commands.evaluate import run

    world = tmp_path / "toy"  # missing: the app generates it (small, for speed)
    overrides = [
        f"paths.toy_dir={world}",
        "data.toy_size=small",
        f"out_dir={tmp_path / 'out'}",
        "seed=1",
        f"+models.tuned.pretrained={micro_file}",
    ]
    out = run(compose(overrides))
    assert (world / "manifest.json").is_file()
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["meta"]["split"] == "test" and payload["meta"]["seed"] == 1
    assert payload["data"]["visu"]["path"] == str(world / "visu" / "test.json")
    assert set(payload["data"]["zeroshot"]) == {"shape", "colour", "scene", "shape_unsafe", "colour_unsafe"}
    assert payload["meta"]["config"]["reference"] == "original"
    assert set(out["results"]["results"]["original"]) == {"zeroshot", "visu", "nsfw_caps", "cost"}
    tuned = out["results"]["results"]["tuned"]
    # the shipped 128-d base against a 32-d micro model: no setting (b), and the report says why
    assert "dimensions" in tuned["visu"]["skipped"]["_ref"] and "U2V_ref_R@1" not in tuned["visu"]
    assert "| metric | original" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.md").is_file() and list((tmp_path / "out" / "plots").glob("*.png"))


def test_app_bad_input_one_line_exit_2(toy_world, micro_file, tmp_path, caplog):
    from saferclip.app.commands.evaluate import run

    base = [f"data.root={toy_world}", "data.make_toy=false", f"out_dir={tmp_path / 'out'}"]
    cases = {
        "model path": (
            ["+models.mine.pretrained=/no/such/run"],
            "model 'mine': pretrained path does not exist: /no/such/run",
        ),
        "arch mismatch": (
            [f"models.original.pretrained={micro_file}", "models.original.arch=saferclip-toy"],
            "holds a saferclip-micro model",
        ),
        "suite": (["suites=[zeroshot,nsfw]"], "unknown suite(s) ['nsfw']"),
    }
    for name, (extra, message) in cases.items():
        caplog.clear()
        with pytest.raises(SystemExit, match="^2$") as exit_info:
            run(compose(base + extra))
        assert exit_info.value.code == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (name, errors)

    # an unreadable image: the one line names the file
    world = tmp_path / "world"
    shutil.copytree(toy_world / "zeroshot", world / "zeroshot")
    victim = sorted((world / "zeroshot" / "colour" / "test").rglob("*.png"))[2]
    victim.write_bytes(b"\x89PNG truncated")
    caplog.clear()
    with pytest.raises(SystemExit, match="^2$"):
        run(compose(base + [f"data.root={world}", "suites=[zeroshot]"]))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(victim) in errors[0] and "cannot read image" in errors[0]


@pytest.mark.slow
def test_app_command_line_error_has_no_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "saferclip.app.commands.evaluate",
        "suites=[visu,bogus]",
        f"paths.output_dir={tmp_path}",
        "data.make_toy=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "unknown suite(s) ['bogus']" in output and "Traceback" not in output
