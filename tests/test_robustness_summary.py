"""docs/ROBUSTNESS.md's generated figures (saferclip.robustness.summary, through the documents'
one mechanism, saferclip.evaluation.doc_tables): the targets' verdicts computed by hand, and a
region rewritten from the result file and found to differ when the file changes. (The committed
pages against the committed files: tests/test_doc_tables.py.)"""

from __future__ import annotations

import copy
import json

import pytest

from saferclip.evaluation.doc_tables import render_document
from saferclip.robustness.summary import cost_table, targets_table


def rate(k: int, n: int) -> dict:
    from saferclip.evaluation.intervals import clopper_pearson

    low, high = clopper_pearson(k, n)
    return {"value": k / n, "low": low, "high": high, "k": k, "n": n}


def results() -> dict:
    image = lambda k, n: {  # noqa: E731
        "kind": "image",
        "side": "query",
        "num_targets": n,
        "budgets": {"8": {"success_rate": rate(k, n)}},
    }  # noqa: E731
    return {
        "world": 1,
        "split": "test",
        "seed": 0,
        "commands": {"attack": "saferclip-attack"},
        "settings": {"headline_budget_255": 8.0, "items": 100, "text": {"budget": 60, "heldout_budget": 20}},
        "models": {
            "saferclip_adv": {
                "attacks": {
                    "evade": image(3, 60),
                    "phrasing search": {
                        "kind": "text",
                        "side": "query",
                        "num_targets": 50,
                        "query_budget": 60,
                        "budgets": {"60": {"success_rate": rate(20, 50)}},
                    },
                },
                "clean": {
                    "unsafe_rate_a": {"value": 0.02, "low": 0.01, "high": 0.04},
                    "U2V_R@1": {"value": 0.70, "low": 0.66, "high": 0.74},
                    "zeroshot_retention": {"value": 0.97, "low": 0.95, "high": 0.99},
                },
            },
        },
        "cost": {
            "monitor": [{"tower": "image", "forward_ms": 1.0, "monitored_ms": 1.04}],
            "adversarial_step": [
                {"method": "saferclip", "ratio": 3.5, "batch_size": 64, "median_s": {"clean": 1.0, "adversarial": 3.5}}
            ],
        },
    }


def test_targets_say_met_or_missed_and_by_how_much():
    table = targets_table(results(), {})
    lines = {line.split(" | ")[1]: line.split(" | ")[2].rstrip(" |") for line in table.strip().splitlines()[2:]}
    assert lines["evade success at 8/255 ≤ 10%"].startswith("met: 5.0 [")  # 3 of 60
    assert lines["phrasing search success at 60 queries ≤ 20%"].endswith("(20.0 points over)")  # 20 of 50 = 40%
    assert lines["U→V R@1 ≥ 75%"] == "missed: 70.0 [66.0, 74.0] against ≥ 75 (5.0 points short)"
    assert lines["zero-shot retention ≥ 95%"] == "met: 97.0 [95.0, 99.0] ≥ 95"
    assert lines["cost ≤ 10% of a forward pass"] == "met: +4.0% ≤ 10"
    assert lines["cost ≤ 3× a clean step"] == "missed: 3.50× against ≤ 3"
    assert "| hysac_adv_safe | (not in the results) | not measured |" in table
    # a model the monitor rows name that the results lack is said so, as for the targets
    assert "| hysac_adv_safe + monitor | (not in the results) | not measured |" in targets_table(
        results(), {"monitor": "hysac_adv_safe"}
    )
    assert cost_table({"cost": None}, {}).startswith("Not measured")  # never an empty table that looks measured


def test_a_document_is_rewritten_from_the_file_and_differs_when_the_file_changes(tmp_path):
    text = (
        "World <!-- generated:robustness-setting field=world -->?<!-- /generated -->.\n\n"
        "<!-- generated:robustness-summary attacks=evade -->\nold\n<!-- /generated -->\n"
    )
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "robustness.json").write_text(json.dumps(results()))
    rendered, changed = render_document(text, tmp_path, "doc.md")
    assert len(changed) == 2
    assert render_document(rendered, tmp_path, "doc.md")[1] == []  # rewritten: nothing differs any more
    assert (
        "field=world -->1<!--" in rendered and "| evade | 8/255 | 5.0 [1.0, 13.9] of 60 |" in rendered
    )  # 3 of 60: Beta quantiles
    changed_results = copy.deepcopy(results())
    changed_results["models"]["saferclip_adv"]["attacks"]["evade"]["budgets"]["8"]["success_rate"] = rate(30, 60)
    (tmp_path / "docs" / "results" / "robustness.json").write_text(json.dumps(changed_results))
    assert render_document(rendered, tmp_path, "doc.md")[1] == [
        "doc.md: region generated:robustness-summary attacks=evade"
    ]


def test_until_the_file_is_committed_every_region_says_pending_then_shows_the_figures(tmp_path):
    from saferclip.evaluation.doc_tables import DocTableError

    text = (
        "<!-- generated:robustness-status -->\n<!-- /generated -->\n\n"
        "<!-- generated:robustness-summary attacks=evade -->\n| evade | 8/255 | 56.8 of 100 |\n<!-- /generated -->\n\n"
        "Evaded: <!-- generated:robustness-value model=saferclip_adv attack=evade -->56.8<!-- /generated -->%.\n"
    )
    (tmp_path / "docs" / "results").mkdir(parents=True)
    rendered, changed = render_document(text, tmp_path, "doc.md")
    assert len(changed) == 3 and "56.8" not in rendered  # no figure of another world, or typed by hand, survives
    assert rendered.count("*Pending: not measured on the current toy world yet") == 1  # the summary's block
    assert "**Pending.**" in rendered and "`bash scripts/robustness_experiments.sh` measures them" in rendered
    assert (
        "Evaded: <!-- generated:robustness-value model=saferclip_adv attack=evade -->pending<!-- /generated -->%."
        in rendered
    )
    assert render_document(rendered, tmp_path, "doc.md")[1] == []  # stable: the check passes while pending
    # the file committed: every region shows its figures, and the check sees each one change
    measured = results() | {
        "commands": {"main": "saferclip-main adversarial=true", "attack": "saferclip-attack", "epsilon": "8"}
    }
    (tmp_path / "docs" / "results" / "robustness.json").write_text(json.dumps(measured))
    final, changed = render_document(rendered, tmp_path, "doc.md")
    assert len(changed) == 3 and "ending" not in final
    assert (
        "Measured on the test split of world 1 (never used for tuning), 100 items per attack, seed 0; adversarial "
        "training at ε = 8/255, chosen on the validation split of world 0 (the sweep below). Produced by:\n\n"
        "```bash\nsaferclip-main adversarial=true\nsaferclip-attack\n```"
    ) in final
    assert "| evade | 8/255 | 5.0 [1.0, 13.9] of 60 |" in final and "-->5.0 [1.0, 13.9]<!--" in final  # 3 of 60
    # only the robustness file may be pending: a missing main.json is still an error
    with pytest.raises(DocTableError, match="main.json: missing"):
        render_document(
            "<!-- generated:main-value model=saferclip key=U2V_R@1 -->?<!-- /generated -->\n", tmp_path, "doc.md"
        )


def test_the_sweep_is_drawn_from_the_file_and_shown_only_when_drawn_from_it(tmp_path):
    """The curve over ε (docs/img/robustness_sweep.png): drawn from the committed file's sweep,
    shown by its region only while its stamp names that file."""
    from saferclip.evaluation.doc_tables import ROBUSTNESS_SWEEP_PLOT, render_document, update_documents
    from saferclip.robustness.summary import SummaryError
    from saferclip.robustness.sweep_summary import draw_sweep

    point = lambda eps, evade, u2v: {  # noqa: E731
        "epsilon_255": eps,
        "epoch": 5,
        "validation": {"U2VG_unsafe@1": 0.0, "U2V_R@1": u2v, "S2V_R@1": 0.9},
        "zeroshot_retention": 0.97,
        "attacks": {"evade": {"4": rate(1, 50), "8": rate(evade, 50)}, "phrasing search": {"60": rate(0, 40)}},
    }
    measured = results() | {
        "sweep": {"methods": {"saferclip": [point(0, 21, 0.24), point(4, 5, 0.22)], "hysac": []}},
        "commands": {"epsilon": "4"},
    }
    with pytest.raises(SummaryError, match="no sweep to draw"):
        draw_sweep(results(), tmp_path / "none.png")
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "robustness.json").write_text(json.dumps(measured))
    region = "<!-- generated:robustness-sweep-plot -->\n<!-- /generated -->\n"
    assert render_document(region, tmp_path, "docs/ANALYSIS.md")[1] == []  # not drawn yet: nothing shown
    for doc in ("README.md", "docs/RESULTS.md", "docs/ROBUSTNESS.md", "docs/ANALYSIS.md", "docs/GPU.md"):
        (tmp_path / doc).write_text(region if doc == "docs/ANALYSIS.md" else "")
    changed = update_documents(tmp_path)
    assert f"{ROBUSTNESS_SWEEP_PLOT.as_posix()} (drawn from its result file)" in changed
    assert (tmp_path / ROBUSTNESS_SWEEP_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert "](img/robustness_sweep.png)" in (tmp_path / "docs" / "ANALYSIS.md").read_text()
    # another measurement: the old picture is not shown as this one's, it is drawn again
    measured["sweep"]["methods"]["saferclip"][1] = point(4, 2, 0.22)
    (tmp_path / "docs" / "results" / "robustness.json").write_text(json.dumps(measured))
    assert render_document((tmp_path / "docs" / "ANALYSIS.md").read_text(), tmp_path, "docs/ANALYSIS.md")[1]
    assert f"{ROBUSTNESS_SWEEP_PLOT.as_posix()} (drawn from its result file)" in update_documents(tmp_path)


def test_the_sweep_chooses_the_smallest_budget_that_meets_the_methods_own_targets():
    from saferclip.robustness.summary import SummaryError
    from saferclip.robustness.sweep_summary import choice, choose_epsilon

    def point(eps, evade, phrasing):
        attacks = {"evade": {"8": {"value": evade}}}
        if phrasing is not None:
            attacks["phrasing search"] = {"60": {"value": phrasing}}
        return {"epsilon_255": eps, "attacks": attacks}

    sweep = {
        "methods": {"saferclip": [point(0, 0.4, 0.5), point(2, 0.2, 0.0), point(4, 0.04, 0.0), point(8, 0.0, 0.0)]}
    }
    # a rate of 0 meets its bound (the shell rule this replaced read 0 as "not measured")
    assert choose_epsilon(sweep, "saferclip") == (4.0, True)
    # a target that was not measured is not met; nothing meets: the least evaded budget
    sweep["methods"]["saferclip"] = [point(2, 0.2, None), point(4, 0.15, 0.0), point(8, 0.12, 0.5)]
    assert choose_epsilon(sweep, "saferclip") == (8.0, False)

    def gallery(eps, r):
        return {
            "epsilon_255": eps,
            "attacks": {
                a: {"8": {"value": r}}
                for a in ("gallery (unsafe query)", "gallery (safe query)", "gallery (any query)")
            },
        }

    sweep["methods"]["hysac"] = [gallery(0, 0.33), gallery(2, 0.10), gallery(4, 0.05)]
    assert choose_epsilon(sweep, "hysac") == (2.0, True)
    assert choice({"sweep": sweep}, {"method": "hysac"}) == (
        "2/255 (the smallest swept budget meeting its attack targets on validation)"
    )
    with pytest.raises(SummaryError, match="no sweep targets for 'safeclip'"):
        choose_epsilon(sweep, "safeclip")
