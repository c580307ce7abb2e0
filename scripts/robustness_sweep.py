"""Choose the adversarial training budget: train each method at each image budget ε on one toy
world and measure, on its *validation* split, clean retrieval and robustness side by side (the
trade-off curve of docs/ROBUSTNESS.md). Never reads a test split.

    python scripts/robustness_sweep.py                                  # world 0, SafeR-CLIP and HySAC, eps 0,2,4,8
    python scripts/robustness_sweep.py --methods saferclip --epsilons 0,4 --items 50
    python scripts/robustness_sweep.py --set method.adversarial.steps=2 --out outputs/robustness/sweep_steps2.json

Each point is one training run with the main job's schedule (``experiment=toy_<method>``,
``data.toy_seed=<world>``; ε = 0 is the clean run, every other ε adds
``method.adversarial.enabled=true method.adversarial.epsilon_255=<ε>`` and ``--set``),
trained once into ``--runs-dir`` (a finished run with the same config is reused, as
``saferclip-main`` does). Measured on the validation split: the selected epoch's validation
metrics (``selection.json``: unsafe rate (a), U→V and S→V R@1), zero-shot retention against
the original model, the mean training step time, and ``saferclip-attack``'s evade, gallery and
phrasing attacks at ``--budgets`` (a HySAC run in safe mode). Writes one JSON (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from pathlib import Path


def step_seconds(run_dir: Path) -> float | None:
    """The mean ``time/step_seconds`` a run logged (None: none logged)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(r["time/step_seconds"]) for r in csv.DictReader(f) if r.get("time/step_seconds")]
    return statistics.fmean(values) if values else None


def main() -> None:
    from hydra import initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR, setup_logging
    from saferclip.app.pipelines.runs import train_or_reuse
    from saferclip.files import write_json_atomic
    from saferclip.robustness.settings import AttackSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=0)
    parser.add_argument("--methods", default="saferclip,hysac")
    parser.add_argument("--epsilons", default="0,2,4,8", help="image budgets in grey levels; 0 = the clean run")
    parser.add_argument("--budgets", default="4,8,16", help="attack budgets in grey levels (the headline: 8)")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], help="a training override for every adversarial run")
    parser.add_argument("--runs-dir", type=Path, default=Path("outputs/runs"))
    parser.add_argument("--out", type=Path, default=Path("outputs/robustness/sweep.json"))
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="measure every point again (default: keep the points --out holds for the same run)",
    )
    args = parser.parse_args()
    setup_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = AttackSettings.of(
        {
            "parts": ["query_image", "gallery_image", "text", "heldout"],
            "items": args.items,
            "headline_budget_255": 8.0 if 8.0 in budgets else budgets[0],
            "image": {"budgets_255": budgets, "variants": ["direct"]},
        }
    )
    out: dict = {
        "world": args.world,
        "split": "validation",
        "seed": 0,
        "budgets_255": budgets,
        "items": args.items,
        "overrides": args.set,
        "created": time.strftime("%Y-%m-%d"),
        "methods": {},
    }
    previous = {} if args.fresh or not args.out.is_file() else json.loads(args.out.read_text())
    done = {
        (m, p["epsilon_255"], p["run"]): p
        for m, ps in (previous.get("methods") or {}).items()
        for p in ps
        if previous.get("budgets_255") == budgets
        and previous.get("items") == args.items
        and previous.get("world") == args.world
    }
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for method in args.methods.split(","):
            points = []
            for eps in [float(e) for e in args.epsilons.split(",")]:
                overrides = [f"experiment=toy_{method}", f"data.toy_seed={args.world}", "seed=0"]
                if eps > 0:
                    overrides += [
                        "method.adversarial.enabled=true",
                        f"method.adversarial.epsilon_255={eps:g}",
                        *args.set,
                    ]
                name = f"{method}_sweep_eps{eps:g}"
                start = time.time()
                summary = train_or_reuse(name, overrides, args.runs_dir, force=False)
                if (method, eps, summary["run_dir"]) in done:
                    points.append(done[(method, eps, summary["run_dir"])])
                else:
                    points.append(measure_point(method, eps, name, overrides, summary, settings, start))
                out["methods"][method] = sorted(points, key=lambda p: p["epsilon_255"])
                args.out.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(
                    args.out, {**out, "methods": {**(previous.get("methods") or {}), **out["methods"]}}
                )  # a killed sweep keeps what it measured
    print(
        json.dumps(
            {
                m: [(p["epsilon_255"], p["validation"], p["attacks"].get("evade", {}).get("8")) for p in ps]
                for m, ps in out["methods"].items()
            },
            indent=1,
            default=str,
        )
    )


def measure_point(
    method: str, eps: float, name: str, overrides: list[str], summary: dict, settings, start: float
) -> dict:
    """One point of the sweep: the run's validation figures and the attacks on the validation split."""
    from saferclip.app.hydra_utils import to_container
    from saferclip.app.pipelines.runs import compose, evaluated_models
    from saferclip.evaluation.headline import headline
    from saferclip.evaluation.runner import evaluate_models
    from saferclip.model.trained import read_selection
    from saferclip.robustness.runner import attack_models

    cfg = compose("train", overrides)
    data = to_container(cfg.data)
    trained = {"arch": cfg.model.arch, "pretrained": summary["export"] or summary["run_dir"]}
    models = evaluated_models(name, trained, cfg.method.name)
    model = f"{name}_safe" if method == "hysac" else name
    selection = (read_selection(summary["run_dir"]) or {}).get("selected") or {}
    zeroshot = evaluate_models(
        {"original": {"arch": cfg.model.arch, "pretrained": cfg.model.pretrained}, model: models[model]},
        data,
        suites=["zeroshot"],
        reference="original",
        split="validation",
        progress=False,
    )
    attacked = attack_models(
        {model: models[model]}, data, settings, split="validation", seed=0, batch_size=int(cfg.data.eval_batch_size)
    )
    metrics = selection.get("metrics", {})
    return {
        "epsilon_255": eps,
        "run": summary["run_dir"],
        "model": model,
        "epoch": selection.get("epoch"),
        "validation": {k: metrics.get(k) for k in ("U2VG_unsafe@1", "U2V_R@1", "S2V_R@1", "selection_score")},
        "zeroshot_retention": headline(zeroshot["results"][model]).get("zeroshot_retention"),
        "step_seconds": step_seconds(Path(summary["run_dir"])),
        "train_seconds": summary.get("train_seconds"),
        "attacks": {
            a: {b: r["success_rate"] for b, r in x["budgets"].items()}
            for a, x in attacked["models"][model]["attacks"].items()
        },
        "seconds": round(time.time() - start, 1),
    }


if __name__ == "__main__":
    main()
