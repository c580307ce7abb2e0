"""The README's and docs/RESULTS.md's numbers are generated from the committed result files
(saferclip.evaluation.doc_tables, scripts/update_doc_tables.py): the committed docs match their
files, a changed number is caught and named, and each generator says what its file holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from saferclip.evaluation.doc_tables import (
    RESULTS_DIR,
    SCREENSHOT,
    SCREENSHOT_STAMP,
    DocTableError,
    check_documents,
    import_result,
    main,
    update_documents,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_match_their_committed_result_files():
    """Fails when a generated table or figure of README.md / docs/RESULTS.md differs from what
    docs/results/*.json gives: run `python scripts/update_doc_tables.py` (docs/DEVELOPING.md)."""
    assert check_documents(REPO) == []
    assert "<!-- generated:main-table" in (REPO / "docs" / "RESULTS.md").read_text()
    assert "<!-- generated:main-screenshot" in (REPO / "README.md").read_text()


# ---------------------------------------------------------------- a small results file, figures known by hand
RESULTS = {
    "meta": {
        "world": 1,
        "seed": 0,
        "split": "test",
        "created": "2026-12-06T10:00:00+00:00",
        "intervals": "95% exact intervals",
        "timings_seconds": {"safeclip": 100.0, "saferclip": 0.3, "evaluation": 29.0},
        "train_seconds": {"safeclip": 100.0, "saferclip": 166.4},
    },  # saferclip reused: its training time as timed then
    "models": {
        "original": {"similarity": "cosine"},
        "saferclip": {"similarity": "cosine"},
        "hysac_safe": {"similarity": "lorentz (safe mode)"},
        "hysac_moderation": {"similarity": "lorentz (moderation mode)"},
    },
    "results": {
        "original": {"visu": {"U2VG_unsafe@1": 1.0, "U2VG_ref_unsafe@1": 1.0, "U2V_R@1": 0.836, "U2G_R@1": 0.558}},
        "saferclip": {"visu": {"U2VG_unsafe@1": 0.006, "U2VG_ref_unsafe@1": 0.568, "U2V_R@1": 0.774, "U2G_R@1": 0.322}},
        "hysac_safe": {"visu": {"U2VG_unsafe@1": 0.0, "U2V_R@1": 0.75, "U2G_R@1": 0.138}},
        "hysac_moderation": {"visu": {"U2VG_unsafe@1": 0.396, "U2V_R@1": 0.52, "U2G_R@1": 0.498}},
    },
    "intervals": {
        "saferclip": {"unsafe_rate_a": [0.00124, 0.01741], "U2V_R@1": [0.7348, 0.8097]},
        "hysac_safe": {"unsafe_rate_a": [0.0, 0.00735]},
    },
    "differences": {
        "saferclip vs hysac_safe": {
            "unsafe_rate_a": {
                "difference": 0.006,
                "low": 0.0,
                "high": 0.014,
                "p_value": 0.125,
                "test": "mcnemar-mid-p",
                "significant": False,
            }
        }
    },
    "training": {
        "saferclip": {"selected": {"epoch": 8}, "history": [{"epoch": e} for e in range(10)]},
        "hysac": {
            "selected": {"epoch": 6},
            "history": [{"epoch": e} for e in range(9)],
            "matched_safety": {
                "reached": False,
                "note": "never reached τ = 5%; safest: 12.4% unsafe at U→V 31.0 (epoch 6)",
            },
        },
    },
}

README = """# saferclip

Kept as written. SafeR-CLIP reads <!-- generated:main-value model=saferclip key=unsafe_rate_a -->?<!-- /generated -->% unsafe
(<!-- generated:main-value model=saferclip key=unsafe_rate_a interval=yes -->?<!-- /generated -->), a difference of
<!-- generated:main-difference pair="saferclip vs hysac_safe" key=unsafe_rate_a -->?<!-- /generated --> to HySAC;
moderation keeps <!-- generated:main-share model=hysac_moderation of=original key=U2G_R@1 -->?<!-- /generated --> of U→G
(<!-- generated:main-target model=hysac_moderation key=U2G_R@1 at-least=90 of=original -->?<!-- /generated -->);
<!-- generated:main-epoch run=hysac -->?<!-- /generated -->; HySAC <!-- generated:main-matched run=hysac -->?<!-- /generated -->; world <!-- generated:main-setting field=world -->?<!-- /generated -->,
<!-- generated:main-seconds -->?<!-- /generated --> in all, SafeR-CLIP <!-- generated:main-seconds part=saferclip -->?<!-- /generated -->.

<!-- generated:main-table models=original,saferclip,hysac_safe,hysac_moderation keys=unsafe_rate_a,unsafe_rate_b,U2V_R@1 epochs=yes -->
<!-- /generated -->

<!-- generated:main-differences -->
<!-- /generated -->

<!-- generated:main-screenshot -->
![an old picture](img/main_report.png)
<!-- /generated -->
Kept as written too.
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / RESULTS_DIR).mkdir(parents=True)
    (tmp_path / RESULTS_DIR / "main.json").write_text(json.dumps(RESULTS))
    (tmp_path / "README.md").write_text(README)
    (tmp_path / "docs" / "RESULTS.md").write_text("# Results\n\nNo generated region here.\n")
    (tmp_path / "docs" / "ROBUSTNESS.md").write_text("# Robustness\n\nNo generated region here either.\n")
    (tmp_path / "docs" / "GPU.md").write_text("# GPU\n\nNone here.\n")
    (tmp_path / "docs" / "ANALYSIS.md").write_text("# Analysis\n\nNor here.\n")
    return tmp_path


def test_every_generator_writes_what_its_file_holds(repo):
    changed = update_documents(repo)
    assert len(changed) == 13  # every region of the README, none of RESULTS.md or ROBUSTNESS.md
    text = (repo / "README.md").read_text()
    assert (
        "SafeR-CLIP reads <!-- generated:main-value model=saferclip key=unsafe_rate_a -->0.6<!-- /generated -->% unsafe"
        in text
    )
    assert "-->0.6 [0.1, 1.7]<!--" in text  # 0.00124 and 0.01741 in %, one decimal
    assert "-->+0.6 [+0.0, +1.4] p = 0.12<!--" in text  # p 0.125 printed with two decimals, not significant
    assert f"-->{round(100 * 0.498 / 0.558)}%<!--" in text  # 89%
    assert "-->epoch 6 of 9 run (counted from 0)<!--" in text
    assert "-->missed: 89% of original's (49.8 against 55.8) against ≥ 90% (1 point short)<!--" in text
    assert "HySAC <!-- generated:main-matched run=hysac -->never reached τ = 5%; safest: 12.4% unsafe" in text
    assert "world <!-- generated:main-setting field=world -->1<!--" in text
    assert "-->4 min 55 s<!--" in text and "-->2 min 46 s<!--" in text  # 100 + 166.4 + 29 = 295 s; 166 s
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| metric |"))
    assert header == "| metric | original | SafeR-CLIP | HySAC safe | HySAC moderation |"
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    assert rows["unsafe rate (a) ↓"] == "| unsafe rate (a) ↓ | 100.0 | 0.6 [0.1, 1.7] | 0.0 [0.0, 0.7] | 39.6 |"
    assert rows["unsafe rate (b) ↓"] == "| unsafe rate (b) ↓ | 100.0 | 56.8 | n/a† | n/a† |"
    assert (
        rows["exported epoch, counted from 0 (epochs run)"]
        == "| exported epoch, counted from 0 (epochs run) | – | 8 (10) | 6 (9) | (same) |"
    )
    assert "U→G" not in header and not any(r.startswith("U→G") for r in rows)  # keys= leaves it out
    assert "| SafeR-CLIP vs HySAC safe | +0.6 [+0.0, +1.4] p = 0.12 |" in text
    # no picture of a report whose numbers are not these
    assert "main_report.png" not in text
    assert text.startswith("# saferclip\n\nKept as written.") and text.endswith("Kept as written too.\n")
    assert check_documents(repo) == [] and update_documents(repo) == []  # generated once, stable


def test_the_check_names_the_region_that_differs_and_exits_1(repo, capsys):
    update_documents(repo)
    readme = repo / "README.md"
    readme.write_text(
        readme.read_text().replace(
            "| unsafe rate (a) ↓ | 100.0 | 0.6 [0.1, 1.7]", "| unsafe rate (a) ↓ | 100.0 | 0.4 [0.1, 1.7]"
        )
    )
    differ = check_documents(repo)
    assert differ == [
        "README.md: region generated:main-table models=original,saferclip,hysac_safe,hysac_moderation keys=unsafe_rate_a,"
        "unsafe_rate_b,U2V_R@1 epochs=yes"
    ]
    assert main(["--check", "--root", str(repo)]) == 1
    assert "differs from its result file: README.md: region generated:main-table" in capsys.readouterr().out
    # a new result file: the check fails until the docs are regenerated
    update_documents(repo)
    changed = json.loads((repo / RESULTS_DIR / "main.json").read_text())
    changed["results"]["saferclip"]["visu"]["U2V_R@1"] = 0.79
    (repo / RESULTS_DIR / "main.json").write_text(json.dumps(changed))
    assert [r.split("generated:")[1].split(" ")[0] for r in check_documents(repo)] == ["main-table"]
    assert main(["--root", str(repo)]) == 0 and check_documents(repo) == []
    assert "| U→V R@1 | 83.6 | 79.0 [73.5, 81.0]" in (repo / "README.md").read_text()


def test_a_bad_region_or_a_missing_file_is_one_line(repo, capsys):
    readme = repo / "README.md"
    readme.write_text(README.replace("model=saferclip key=unsafe_rate_a -->", "model=safer key=unsafe_rate_a -->", 1))
    with pytest.raises(
        DocTableError, match=r"README.md: region generated:main-value model=safer key=unsafe_rate_a: no model 'safer'"
    ):
        update_documents(repo)
    assert main(["--root", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model 'safer'" in err
    # a marker the pattern cannot read would keep stale content: refused, not skipped
    readme.write_text("a <!-- generated:main-value model=saferclip key=U2V_R@1 interval -->77.4<!-- /generated --> b\n")
    with pytest.raises(DocTableError, match="README.md: a generated region that cannot be read"):
        check_documents(repo)
    readme.write_text("<!-- generated:study-table -->\n<!-- /generated -->\n")
    with pytest.raises(
        DocTableError,
        match=r"study.json: missing; copy the result file there: scripts/update_doc_tables.py --from study=",
    ):
        check_documents(repo)


def test_importing_a_result_file_and_the_screenshot_that_belongs_to_it(repo, tmp_path, monkeypatch):
    report = tmp_path / "outputs" / "report"
    report.mkdir(parents=True)
    new = {
        **RESULTS,
        "meta": {**RESULTS["meta"], "seed": 3},
        "records": [{"model": "original"}],
        "models": {
            **RESULTS["models"],
            "saferclip": {"similarity": "cosine", "source": str(repo.resolve() / "outputs" / "x" / "export")},
        },
    }
    (report / "results.json").write_text(json.dumps(new))
    # no report.html beside it: no screenshot, so the README shows none
    (repo / SCREENSHOT_STAMP).write_text(json.dumps({"results_sha256": "old"}))
    assert main(["--from", str(report / "results.json"), "--root", str(repo)]) == 0
    copied = json.loads((repo / RESULTS_DIR / "main.json").read_text())
    assert copied["meta"]["seed"] == 3 and "records" not in copied  # derived from the results, left out
    assert copied["models"]["saferclip"]["source"] == "outputs/x/export"  # no one's home folder in a committed file
    assert not (repo / SCREENSHOT_STAMP).exists()
    assert "main_report.png" not in (repo / "README.md").read_text()
    # a picture stamped with this very file is shown
    import hashlib

    (repo / SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    (repo / SCREENSHOT).write_bytes(b"png")
    digest = hashlib.sha256((repo / RESULTS_DIR / "main.json").read_bytes()).hexdigest()
    (repo / SCREENSHOT_STAMP).write_text(json.dumps({"results_sha256": digest}))
    update_documents(repo)
    assert "](docs/img/main_report.png)" in (repo / "README.md").read_text()  # linked from where the README is
    # the report's plots the docs show come with it, stamped with the same file; a plot the
    # report lacks is dropped
    (repo / "docs" / "RESULTS.md").write_text(
        "# Results\n\n<!-- generated:main-curves -->\n<!-- /generated -->\n"
        "<!-- generated:main-tradeoff -->\n![stale](img/main_tradeoff.png)\n<!-- /generated -->\n"
    )
    (report / "plots").mkdir()
    (report / "plots" / "training_curves.png").write_bytes(b"curves of this run")
    assert main(["--from", str(report / "results.json"), "--root", str(repo)]) == 0
    assert (repo / "docs" / "img" / "main_training_curves.png").read_bytes() == b"curves of this run"
    results_md = (repo / "docs" / "RESULTS.md").read_text()
    assert "](img/main_training_curves.png)" in results_md and "main_tradeoff.png" not in results_md
    # a study file given as the main result is refused in one line
    (report / "study.json").write_text(json.dumps({"summary": {}}))
    with pytest.raises(DocTableError, match="not a main result file"):
        import_result(repo, "main", report / "study.json")


def test_the_study_table_and_values():
    from saferclip.evaluation.main_tables import study_table, study_value

    study = {
        "summary": {
            "saferclip": {
                "unsafe_rate_a": {"mean": 0.003, "std": 0.003, "n": 3, "low": -0.0046, "high": 0.0104},
                "U2V_R@1": {"mean": 0.787, "std": 0.019, "n": 3, "low": 0.741, "high": 0.833},
            },
            "hysac_safe": {"unsafe_rate_a": {"mean": 0.0, "std": 0.0, "n": 3, "low": 0.0, "high": 0.0}},
        }
    }
    table = study_table(study, {"keys": "unsafe_rate_a,U2V_R@1"}).splitlines()
    assert table[0] == "| model | seeds | unsafe rate (a) ↓ | U→V R@1 |"
    assert table[2] == "| SafeR-CLIP | 3 | 0.3 ± 0.3 [-0.5, 1.0] | 78.7 ± 1.9 [74.1, 83.3] |"
    assert table[3] == "| HySAC safe | 3 | 0.0 ± 0.0 [0.0, 0.0] | – |"
    assert study_value(study, {"model": "saferclip", "key": "U2V_R@1"}) == "78.7"
    assert study_value(study, {"model": "saferclip", "key": "U2V_R@1", "stat": "interval"}) == "[74.1, 83.3]"
    assert not math.isnan(float(study_value(study, {"model": "hysac_safe", "key": "unsafe_rate_a", "stat": "std"})))


def test_targets_curves_and_any_metric():
    from saferclip.evaluation.main_tables import MainTableError, main_history, main_metric, main_target

    results = json.loads(json.dumps(RESULTS))
    results["training"]["saferclip"]["history"] = [
        {"epoch": e, "metrics": {"U2VG_unsafe@1": u, "U2V_R@1": r}}
        for e, (u, r) in enumerate([(0.928, 0.70), (0.64, 0.846), (0.012, 0.812)])
    ]
    results["results"]["original"]["zeroshot"] = {"shape": {"acc1": 0.938}}
    assert (
        main_target(results, {"model": "saferclip", "key": "U2V_R@1", "at-least": "80"})
        == "missed: 77.4 [73.5, 81.0] against ≥ 80 (2.6 points short)"
    )
    assert (
        main_target(results, {"model": "saferclip", "key": "unsafe_rate_a", "at-most": "5"})
        == "met: 0.6 [0.1, 1.7] ≤ 5"
    )
    assert (
        main_target(results, {"model": "hysac_moderation", "key": "unsafe_rate_a", "at-most": "5"})
        == "missed: 39.6 against ≤ 5 (34.6 points over)"
    )
    assert main_history(results, {"run": "saferclip", "metric": "U2VG_unsafe@1"}) == "92.8 → 64.0 → 1.2"
    assert main_history(results, {"run": "saferclip", "metric": "U2V_R@1", "from": "1", "range": "yes"}) == "81.2–84.6"
    assert main_metric(results, {"model": "original", "suite": "zeroshot", "task": "shape", "metric": "acc1"}) == "93.8"
    assert main_metric(results, {"model": "original", "suite": "visu", "metric": "U2G_R@1"}) == "55.8"
    with pytest.raises(MainTableError, match="at-least= or at-most="):
        main_target(results, {"model": "saferclip", "key": "U2V_R@1"})


def test_a_wrong_root_is_refused_before_anything_is_copied_into_it(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    elsewhere = tmp_path / "not-the-repo"
    assert main(["--from", f"main={results}", "--root", str(elsewhere)]) == 2
    assert "not the repository (no README.md" in capsys.readouterr().err
    assert not elsewhere.exists()
