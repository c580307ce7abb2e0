"""The child side of the kill -9 tests (tests/test_crash_safety.py).

    python -m crash_helpers TASK POINT ARGS_JSON

runs one piece of saferclip's real work (TASK) with a stall installed at POINT: on reaching it,
the child prints ``AT <point>`` and sleeps, and the parent kills it with SIGKILL there. The
stalls wrap library functions from outside (monkeypatching); the library has no test hooks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

POINT = ""


def stall(label: str) -> None:
    if label == POINT:
        print(f"AT {label}", flush=True)
        time.sleep(300)


def install_swap_stall(prefix: str) -> None:
    """Stall right before (``<prefix> swap``) the finished temporary folder is renamed into place."""
    import saferclip.files as files

    swap = files._swap_in

    def stalled(tmp, out, replace):
        stall(f"{prefix(out)} swap")
        return swap(tmp, out, replace)

    files._swap_in = stalled


def toy_set(world: Path, limit: int = 40):
    from saferclip.data.records import Mode, Quadruplet, QuadrupletSet

    records = json.loads((world / "visu" / "train.json").read_text())["data"]
    items = [
        Quadruplet(id=key, safe_caption=r["safe"], unsafe_caption=r["nsfw"],
                   safe_image=world / "visu" / "train2017" / f"{r['coco_id']:012d}.png",
                   unsafe_image=world / "visu" / r["nsfw_im_path"])
        for key, r in list(records.items())[:limit]
    ]  # fmt: skip
    return QuadrupletSet(items, Mode.FULL, str(world / "visu" / "train.json"))


def micro():
    from saferclip.model.build import build_clip

    torch.manual_seed(0)
    return build_clip("saferclip-micro")


def cache_and_neighbours(world: str, cache_dir: str):
    """What training's prepare() does: the frozen-embedding cache, then the saved neighbours."""
    from saferclip.redirection.cache import build_or_load_cache
    from saferclip.redirection.neighbour_config import NeighbourConfig
    from saferclip.redirection.neighbours import load_or_find_safe_neighbours

    cache = build_or_load_cache(micro(), toy_set(Path(world)), cache_dir, batch_size=8, progress=False)
    neighbours = load_or_find_safe_neighbours(cache, NeighbourConfig(k=3, mode="joint", use_extra_pool=False))
    return cache, neighbours


def _cache_task(args: dict) -> None:
    import saferclip.redirection.cache as ec
    import saferclip.redirection.cache_format as cache_format
    import saferclip.redirection.neighbours as ix

    text_batches = ec._text_batches

    def stalled_batches(*a, **k):
        for i, batch in enumerate(text_batches(*a, **k)):
            yield batch
            if i == 1:
                stall("embedding")  # two batches of an array written

    ec._text_batches = stalled_batches
    for module, label in ((cache_format, "cache meta"), (ix, "neighbours meta")):
        write = module.write_json_atomic
        module.write_json_atomic = lambda *a, _w=write, _l=label, **k: (stall(_l), _w(*a, **k))[1]
    install_swap_stall(lambda out: "neighbours" if out.parent.name == "neighbours" else "cache")
    cache_and_neighbours(args["world"], args["cache_dir"])


def export_micro(out: str, fmt: str, force: bool = True) -> Path:
    bundle = micro()
    if fmt == "hf":
        from saferclip.export.hf import export_hf

        return export_hf(bundle.model, bundle.arch, out, tokenizer=bundle.tokenizer, force=force)
    from saferclip.export.open_clip import export_open_clip

    return export_open_clip(bundle, bundle.arch, out, force=force)


def _export_task(args: dict) -> None:
    import saferclip.export.hf as hf
    import saferclip.export.open_clip as oc

    module = hf if args["format"] == "hf" else oc
    save = module.save_state_dict

    def stalled_save(*a, **k):
        save(*a, **k)
        stall("weights")  # the weights written, the rest of the folder not yet

    module.save_state_dict = stalled_save
    install_swap_stall(lambda out: "export")
    export_micro(args["out"], args["format"])


def _study_task(args: dict) -> None:
    import saferclip.files as files

    write_json = files.write_json_atomic

    def stalled_json(path, obj):
        stall(f"write {Path(path).name}")
        return write_json(path, obj)

    files.write_json_atomic = stalled_json
    import saferclip.evaluation.runner as runner

    evaluate = runner.evaluate_models

    def stalled_evaluate(*a, **k):
        stall("evaluation")
        return evaluate(*a, **k)

    runner.evaluate_models = stalled_evaluate
    run_study(args)


def run_study(args: dict) -> dict:
    """saferclip-study's run() with its training replaced by a ready export (every variant is
    the same micro model): the evaluation, the per-seed files and study.json are real."""
    from hydra import initialize_config_dir

    import saferclip.app.study as study
    from saferclip.app.hydra_utils import CONF_DIR
    from saferclip.app.main_job import compose

    def trained(name, overrides, runs_dir, force):
        return {"name": name, "run_dir": args["export"], "export": args["export"], "overrides": overrides}

    study.train_or_reuse = trained
    study.read_selection = lambda run_dir: None
    # the stand-in export is a Euclidean CLIP: HySAC's two modes and radius sweep do not apply to it
    own = ["seeds=[0]", "ablation_seeds=[]", f"out_dir={args['out_dir']}", f"runs_dir={args['out_dir']}/runs",
           "eval.suites=[zeroshot]", "eval.oracle=null", "~methods.hysac"]  # fmt: skip
    rest = ["model=micro", "data.toy_size=small", f"paths.toy_dir={args['world']}", "data.eval_batch_size=64"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return study.run(compose("study", own), rest)


def _prepare_task(args: dict) -> None:
    """Two of these started together on one cache folder: report what each built."""
    import saferclip.redirection.neighbours as ix

    search = ix.find_safe_neighbours

    def counted(*a, **k):
        print("SEARCHED", flush=True)
        return search(*a, **k)

    ix.find_safe_neighbours = counted
    cache, _ = cache_and_neighbours(args["world"], args["cache_dir"])
    print("CACHE REUSED" if cache.was_reused else "CACHE BUILT", flush=True)


def barrier(folder: str, parties: int, timeout: float = 120) -> None:
    """Wait until ``parties`` processes have reached this point (each leaves a file in ``folder``)."""
    here = Path(folder)
    here.mkdir(parents=True, exist_ok=True)
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(here.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(here.iterdir()))} of {parties} processes reached the barrier")
        time.sleep(0.01)


def _train_or_reuse_task(args: dict) -> None:
    """Two of these started together on one runs_dir (two main jobs / studies): the run is
    trained once (training replaced by a slow stand-in that writes its run folder). Both call
    ``train_or_reuse`` after a barrier, and print when (``CALLED``, ``RETURNED``, the training's
    ``TRAINED start= end=``), so the parent can tell that the two calls overlapped."""
    from hydra import initialize_config_dir

    import saferclip.app.train as train_app
    from saferclip.app.hydra_utils import CONF_DIR
    from saferclip.app.main_job import train_or_reuse

    def fake_train(cfg):
        start = time.time()
        run_dir = Path(cfg.paths.run_dir)
        time.sleep(3)
        (run_dir / "weights.txt").write_text(str(cfg.seed))
        print(f"TRAINED start={start!r} end={time.time()!r}", flush=True)
        return {"export": None, "best_checkpoint": str(run_dir / "weights.txt")}

    train_app.train = fake_train
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        barrier(args["barrier"], args["parties"])
        print(f"CALLED {time.time()!r}", flush=True)
        summary = train_or_reuse("saferclip", ["model=micro", "seed=3"], Path(args["runs_dir"]), False)
        print(f"RETURNED {time.time()!r}", flush=True)
    print("SUMMARY " + json.dumps(summary["best_checkpoint"]), flush=True)


TASKS = {"cache": _cache_task, "export": _export_task, "study": _study_task, "prepare": _prepare_task,
         "train_or_reuse": _train_or_reuse_task}  # fmt: skip

if __name__ == "__main__":
    torch.set_num_threads(1)
    task, POINT, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    TASKS[task](json.loads(raw))
    print("DONE", flush=True)
