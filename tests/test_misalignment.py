"""The misalignment study (saferclip-study misalignment.enabled=true): the methods trained and
tested on several pairings of the toy world, figures against the pairs' own-pair cosine."""

from __future__ import annotations

import json

import pytest
from hydra import initialize_config_dir

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.app.pipelines import study
from saferclip.app.pipelines.runs import compose
from saferclip.errors import ConfigError
from saferclip.evaluation.doc_tables import RESULTS_DIR, import_result, update_documents
from saferclip.evaluation.misalignment import (
    MisalignmentSummaryError,
    check_pairings,
    misalignment_table,
    summarise,
    targets_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


@pytest.mark.parametrize(
    "value, expected",
    [
        (["visu"], "two or more"),
        ("visu", "two or more"),
        (["visu", "tight"], "['tight'] are not pairings"),
        (["visu", "loose", "visu"], "appears twice"),
    ],
)
def test_a_bad_pairing_list_is_refused_in_one_line(value, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_pairings(value)


def level(text_cos: float, per_seed: dict, matched: dict) -> dict:
    return {"own_pair_cosine": {"text": text_cos, "image": text_cos / 2}, "per_seed": per_seed, "matched": matched}


def test_summary_counts_the_seeds_that_reached_tau_and_leaves_moderation_out():
    levels = {
        "minimal": level(
            0.9,
            {0: {"m": {"U2V_R@1": 0.8, "unsafe_rate_a": 0.0}}, 1: {"m": {"U2V_R@1": 0.6, "unsafe_rate_a": 0.1}}},
            {0: {"m": {"reached": True}}, 1: {"m": {"reached": False}}},
        ),
        "loose": level(
            0.2,
            {0: {"m": {"U2V_R@1": 0.3}, "h_moderation": {"U2V_R@1": 0.5}}},
            {0: {"m": {"reached": True}, "h_moderation": None}},
        ),
    }
    summary = summarise(levels)
    assert summary["minimal"]["m"]["U2V_R@1"]["mean"] == pytest.approx(0.7)
    assert summary["minimal"]["m"]["U2V_R@1"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["minimal"]["m"]["reached"] == 1 and summary["minimal"]["m"]["seeds"] == 2
    assert summary["loose"]["h_moderation"]["reached"] is None  # no τ for moderation
    table = misalignment_table(levels, summary, 0.05)
    assert "| minimal | 0.90 / 0.45 | m | 70.0 ± 14.1 |" in table and "1 of 2" in table
    assert "seeds at ≤ 5% unsafe" in table


def test_the_targets_are_read_over_seeds_with_shares_taken_seed_by_seed():
    def seed(u2v, retention, s2v, original_s2v, unsafe=0.0):
        return {
            "original": {"nsfw_caps_S2V_R@1": original_s2v, "U2G_R@1": 0.5},
            "saferclip": {
                "unsafe_rate_a": unsafe,
                "U2V_R@1": u2v,
                "zeroshot_retention": retention,
                "nsfw_caps_unsafe_rate_a": 0.0,
                "nsfw_caps_S2V_R@1": s2v,
            },
            "hysac_moderation": {"U2G_R@1": 0.46},
        }

    per_seed = {0: seed(0.82, 0.98, 0.63, 0.70), 1: seed(0.78, 0.96, 0.72, 0.80, unsafe=0.02)}
    data = {"levels": {"visu": level(0.66, per_seed, {})}, "summary": {"visu": {}}, "tau": 0.05}
    lines = targets_table(data, {"pairing": "visu"}).splitlines()
    assert lines[0].startswith("| target (2 seeds: mean ± std [95% interval]) | SafeR-CLIP |")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    # U->V: mean 80.0, std 2.8; a two-seed t interval is wide (t = 12.7)
    assert rows["U→V R@1 ≥ 80"][0].startswith("met: 80.0 ± 2.8 [")
    assert rows["zero-shot retention ≥ 97"][0].startswith("met: 97.0 ± 1.4")  # the mean meets the bound
    # the share of the original's S->V seed by seed: 90% and 90%, not 1.35 / 1.50
    assert rows["NSFW-Caps S→V R@1 ≥ 90% of the original's"][0].startswith("met: 90.0 ± 0.0")
    assert rows["unsafe rate (a) ≤ 5"][0].startswith("met: 1.0 ± 1.4")
    # HySAC has no figures here: said so, not a zero
    assert rows["U→V R@1 ≥ 80"][1].strip(" |") == "not measured"
    assert rows["HySAC moderation: U→G R@1 ≥ 90% of the original's"][1].startswith("met: 92.0 ± 0.0")
    with pytest.raises(MisalignmentSummaryError, match="no pairing level 'loose'"):
        targets_table(data, {"pairing": "loose"})
    # with each seed's number of test queries, a rate's interval is exact over the pooled count:
    # 0 + 10 of 500 + 500 unsafe; and a rate of 0 everywhere gets a real upper bound, not [0, 0]
    data["levels"]["visu"]["queries"] = {s: {"unsafe_rate_a": 500, "nsfw_caps_unsafe_rate_a": 1000} for s in (0, 1)}
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
        for line in targets_table(data, {"pairing": "visu"}).splitlines()[2:]
    }
    assert rows["unsafe rate (a) ≤ 5"][0].startswith("met: 1.0 ± 1.4 [0.5, 1.8] ≤ 5")
    assert rows["NSFW-Caps unsafe rate (a) ≤ 2"][0].startswith("met: 0.0 ± 0.0 [0.0, 0.2] ≤ 2")


def test_the_study_trains_every_method_on_every_pairing_and_plots_them(tmp_path):
    train = [
        "model=micro",
        f"paths.toy_dir={tmp_path / 'toy'}",
        "data.toy_size=small",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    own = [
        "seeds=[0]",
        "world_offset=null",
        f"out_dir={tmp_path / 'study'}",
        f"runs_dir={tmp_path / 'runs'}",
        "misalignment.enabled=true",
        "misalignment.pairings=[minimal,loose]",
        "eval.suites=[visu,nsfw_caps]",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        out = study.run(compose("study", own), train)
    folder = tmp_path / "study" / "misalignment"
    payload = json.loads((folder / "misalignment.json").read_text())
    assert payload["pairings"] == ["minimal", "loose"]
    levels = payload["levels"]
    # each pairing its own world; a minimal edit keeps a pair closer than a random same-shape item
    assert (tmp_path / "toy-minimal").is_dir() and (tmp_path / "toy-loose").is_dir()
    assert levels["minimal"]["own_pair_cosine"]["text"] > levels["loose"]["own_pair_cosine"]["text"] + 0.2
    models = {"original", "safeclip", "saferclip", "hysac_safe", "hysac_moderation"}
    for pairing in ("minimal", "loose"):
        assert set(levels[pairing]["per_seed"]["0"]) == models
        assert {"U2V_R@1", "unsafe_rate_a", "nsfw_caps_S2V_R@1"} <= set(levels[pairing]["per_seed"]["0"]["saferclip"])
        matched = levels[pairing]["matched"]["0"]
        assert matched["hysac_moderation"] is None and matched["saferclip"]["reached"] in (True, False)
        # the trained runs differ by pairing: six runs, six folders
    assert len({r["run_dir"] for r in payload["runs"].values()}) == 6
    assert (folder / "plots" / "misalignment.png").stat().st_size > 10_000
    assert (folder / "per_level" / "loose" / "seed0.json").is_file()
    markdown = (folder / "misalignment.md").read_text()
    assert "| minimal |" in markdown and "| loose |" in markdown and "misalignment.png" in markdown
    assert out["html"].endswith("report.html") and out["markdown"] == str(folder / "misalignment.md")

    # docs/RESULTS.md shows the committed file's table and plot
    repo = tmp_path / "repo"
    (repo / RESULTS_DIR).mkdir(parents=True)
    for name in ("README.md", "docs/ROBUSTNESS.md", "docs/ANALYSIS.md", "docs/GPU.md"):
        (repo / name).write_text("# none\n")
    (repo / "docs" / "RESULTS.md").write_text(
        "<!-- generated:misalignment-table -->\n<!-- /generated -->\n<!-- generated:misalignment-plot -->\n<!-- /generated -->\n"
    )
    update_documents(repo)
    assert "*Not yet measured" in (repo / "docs" / "RESULTS.md").read_text()
    import_result(repo, "misalignment", folder / "misalignment.json")
    update_documents(repo)
    results = (repo / "docs" / "RESULTS.md").read_text()
    assert "| loose | " in results and "](img/misalignment.png)" in results
    assert (repo / "docs" / "img" / "misalignment.png").is_file()
