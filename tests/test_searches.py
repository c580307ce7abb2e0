"""The searches' record (search.json) and what the docs show of it: the table, the best
settings and the Pareto fronts, pending until the file is committed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saferclip.evaluation.doc_tables import RESULTS_DIR, check_documents, import_result, update_documents
from saferclip.evaluation.searches import (
    SearchSummaryError,
    search_record,
    searches_best,
    searches_front,
    searches_table,
)


def trial(number, state, reached=None, unsafe=(0.5, 0.02), start=0, minutes=3):
    history = [
        {"epoch": e, "U2VG_unsafe@1": u, "U2V_R@1": 0.2 + 0.01 * e, "selection_score": 0.6}
        for e, u in enumerate(unsafe)
    ]
    matched = None if reached is None else {"reached": reached, "note": f"trial {number} note", "epoch": 1}
    return {
        "number": number,
        "state": state,
        "value": 0.7 if state == "complete" else None,
        "params": {"lr": 1e-4},
        "matched": matched,
        "seconds": 60.0 * minutes,
        "epochs": len(unsafe),
        "start": f"2026-12-07T0{start}:00:00",
        "end": f"2026-12-07T0{start}:{minutes:02d}:00" if state != "fail" else None,
        "history": history,
    }


def record(name="saferclip"):
    trials = [
        trial(0, "fail", start=1),
        trial(1, "complete", reached=True, start=2),
        trial(2, "complete", reached=False, unsafe=(0.9, 0.4), start=3),
        trial(3, "pruned", start=4),
    ]
    overrides = ["method.optimizer.lr=0.0005153527932385145", "method.neighbours.k=1", "method.curriculum=false"]
    best = {"number": 1, "value": 0.7, "overrides": overrides, "matched": trials[1]["matched"]}
    return search_record(name, trials, budget=3, random_trials=2, tau=0.05, world=0, seed=0, best=best)


def test_the_record_counts_trials_time_and_what_reached_tau():
    r = record()
    assert r["counts"] == {"complete": 2, "pruned": 1, "fail": 1}
    assert (r["random_trials"], r["tpe_trials"]) == (2, 1)  # of the 3 finished trials
    assert r["reached"] == 1 and r["training_seconds"] == 4 * 180
    assert r["wall_seconds"] == 3 * 3600 + 180  # 01:00 to 04:03
    assert len(r["epochs"]) == 8 and {"trial", "epoch", "U2VG_unsafe@1"} <= set(r["epochs"][0])
    assert all("history" not in t for t in r["trials"])


def test_the_table_and_best_setting():
    data = {"searches": {"hysac": record("hysac"), "saferclip": record()}}
    table = searches_table(data, {})
    lines = table.splitlines()
    assert lines[2].startswith(
        "| SafeR-CLIP | 2 / 1 / 1 (3) | 2 + 1 | 12 min | 3 h 03 min | 1 of 2 | #1: trial 1 note |"
    )
    assert lines[3].startswith("| HySAC |")  # Safe-CLIP, SafeR-CLIP, HySAC order
    # floats to the three digits a search resolves; integers and words as they are
    assert searches_best(data, {"method": "saferclip"}) == (
        "`method.optimizer.lr=0.000515` `method.neighbours.k=1` `method.curriculum=false`"
    )
    with pytest.raises(SearchSummaryError, match="no search 'safeclip'"):
        searches_best(data, {"method": "safeclip"})
    # the front at tau: the best U->V of any trial x epoch at most 5% unsafe (epoch 1 of the
    # trials that got to 2%, the first of equals; trial 2's epochs, 90% and 40% unsafe, are out)
    assert searches_front(data, {"method": "saferclip"}) == "U→V 21.0 at 2.0% unsafe (trial 0, epoch 1)"
    never = record()
    never["epochs"] = [p for p in never["epochs"] if p["U2VG_unsafe@1"] > 0.05]
    assert searches_front({"searches": {"saferclip": never}}, {"method": "saferclip"}) == "no epoch reached τ = 5%"


def test_docs_say_pending_until_the_file_comes_then_show_table_and_plot(tmp_path: Path):
    (tmp_path / RESULTS_DIR).mkdir(parents=True)
    text = (
        "# Results\n\n<!-- generated:searches-table -->\n<!-- /generated -->\n\n"
        "SafeR-CLIP: <!-- generated:searches-best method=saferclip -->?<!-- /generated -->\n\n"
        "<!-- generated:searches-pareto -->\n<!-- /generated -->\n"
    )
    for name in ("README.md", "docs/RESULTS.md", "docs/ROBUSTNESS.md", "docs/ANALYSIS.md", "docs/GPU.md"):
        (tmp_path / name).write_text(text if name == "docs/RESULTS.md" else "# none\n")
    update_documents(tmp_path)
    pending = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert (
        "*Not yet measured: the three searches" in pending
        and "SafeR-CLIP: <!-- generated:searches-best method=saferclip -->not yet measured" in pending
    )
    source = tmp_path / "searches.json"
    source.write_text(json.dumps({"searches": {"saferclip": record(), "hysac": record("hysac")}}))
    import_result(tmp_path, "searches", source)
    update_documents(tmp_path)
    done = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| SafeR-CLIP | 2 / 1 / 1 (3) |" in done and "`method.optimizer.lr=0.000515`" in done
    assert (
        "](img/search_pareto.png)" in done and (tmp_path / "docs" / "img" / "search_pareto.png").stat().st_size > 5000
    )
    assert check_documents(tmp_path) == []
    # drawn once: a second update leaves the image alone, but one whose stamp names older
    # drawing code is drawn again (the plot follows its code, not only its data)
    image = tmp_path / "docs" / "img" / "search_pareto.png"
    stamp = tmp_path / "docs" / "results" / "search_pareto_plot.json"
    assert len(json.loads(stamp.read_text())["drawn_by_sha256"]) == 64
    image.write_bytes(b"not redrawn")
    update_documents(tmp_path)
    assert image.read_bytes() == b"not redrawn"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "drawn_by_sha256": "older code"}))
    update_documents(tmp_path)
    assert image.read_bytes().startswith(b"\x89PNG")
    # a file that is not a searches record is refused by name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"levels": {}}))
    with pytest.raises(Exception, match="no 'searches' section"):
        import_result(tmp_path, "searches", bad)


def test_the_gathering_script_names_a_missing_search(tmp_path: Path):
    (tmp_path / "saferclip").mkdir()
    (tmp_path / "saferclip" / "search.json").write_text(json.dumps(record()))
    script = Path(__file__).resolve().parents[1] / "scripts" / "search_results.py"
    run = subprocess.run([sys.executable, str(script), "--tune-dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and str(tmp_path / "safeclip" / "search.json") in run.stderr
    run = subprocess.run(
        [sys.executable, str(script), "--tune-dir", str(tmp_path), "--methods", "saferclip"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    gathered = json.loads((tmp_path / "searches.json").read_text())
    assert gathered["searches"]["saferclip"]["counts"]["complete"] == 2
