"""kill -9 at chosen moments of the work saferclip writes and later reads, then the same work
again: the rerun completes, nothing half-written is read, and the files equal an
uninterrupted run's. (Training's own kill tests are in tests/test_checkpoints.py; the ViSU
image generation's in tests/test_visu_generation.py.) Each child is tests/crash_helpers.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import crash_helpers as ch
import numpy as np
import pytest
from train_helpers import time_budget

from saferclip import integrity

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def kill_at(task: str, point: str, args: dict, timeout: float = 120) -> None:
    """Run the child until it reports ``point``, then SIGKILL it there; a child that reaches no
    point within ``timeout`` (even a silent one) is killed then. A test calls this at most three
    times, with its other work: 3 x 120 s fit its 600 s limit."""
    proc = subprocess.Popen([sys.executable, "-m", "crash_helpers", task, point, json.dumps(args)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    reached = False
    try:
        for line in proc.stdout:
            if line.strip() == f"AT {point}":
                reached = True
                proc.send_signal(signal.SIGKILL)
                break
            if line.startswith("DONE"):
                break
    finally:
        watchdog.cancel()
        proc.wait(timeout=10)
    assert reached and proc.returncode == -signal.SIGKILL, (
        f"{task}: never reached {point!r}: {proc.stderr.read()[-3000:]}"
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp" in p.name or ".old-" in p.name or p.name.endswith(".lock")
    )


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ---------------------------------------------------------------- the cache and the neighbours
CACHE_ARRAYS = ("safe_text", "unsafe_text", "safe_image", "unsafe_image")
NEIGHBOUR_ARRAYS = ("indices", "similarities", "weights", "pair_weight", "difficulty", "bucket", "flagged")


def test_cache_and_neighbour_search_survive_kill_9(toy_world, tmp_path):
    reference, ref_neighbours = ch.cache_and_neighbours(str(toy_world), str(tmp_path / "reference"))
    for point in ("embedding", "cache swap", "neighbours meta"):
        cache_dir = tmp_path / point.replace(" ", "-")
        kill_at("cache", point, {"world": str(toy_world), "cache_dir": str(cache_dir)})
        final = cache_dir / reference.key
        whole = point.startswith("neighbours")
        assert final.is_dir() == whole, point  # the cache appears whole or not at all
        assert not (final / "neighbours").is_dir() or not any((final / "neighbours").glob("[!.]*")), point
        integrity.forget()
        cache, neighbours = ch.cache_and_neighbours(str(toy_world), str(cache_dir))
        assert cache.was_reused == whole, point
        for name in CACHE_ARRAYS:
            assert np.array_equal(getattr(cache, name).numpy(), getattr(reference, name).numpy()), (point, name)
        for name in NEIGHBOUR_ARRAYS:
            assert np.array_equal(getattr(neighbours, name).numpy(), getattr(ref_neighbours, name).numpy()), (
                point,
                name,
            )
        assert cache.meta["checksums"] == reference.meta["checksums"], point  # byte-identical arrays
        assert leftovers(cache_dir) == [], point  # what the killed build left was cleared


# ---------------------------------------------------------------- exports
@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_export_survives_kill_9(tmp_path, fmt):
    if fmt == "hf":
        pytest.importorskip(
            "transformers",
            reason="transformers is not installed: the downstream extra (pip install -e '.[downstream]')",
        )
    reference = files_of(ch.export_micro(str(tmp_path / "reference" / "export"), fmt))  # same name: the card shows it
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("the previous export\n")  # replaced only by a whole new one
    for point in ("weights", "export swap"):
        kill_at("export", point, {"out": str(out), "format": fmt})
        assert files_of(out) == {"notes.txt": b"the previous export\n"}, point  # untouched
    ch.export_micro(str(out), fmt)
    assert files_of(out) == reference
    # a killed export's hidden temporary folder (.export.*.tmp) may stay beside it: never read
    integrity.forget()
    if fmt == "open_clip":
        from saferclip.model.build import build_clip

        build_clip(None, out)  # loads, checksums verified
    else:
        from saferclip.export.hf import verify_export

        verify_export(out)


# ---------------------------------------------------------------- a study's evaluation
def test_study_evaluation_survives_kill_9(toy_world, tmp_path):
    export = ch.export_micro(str(tmp_path / "model"), "open_clip")
    reference = ch.run_study({"world": str(toy_world), "export": str(export), "out_dir": str(tmp_path / "reference")})
    out = tmp_path / "study"
    for point in ("evaluation", "write study.json"):  # before the evaluation; after it, before the summary
        kill_at("study", point, {"world": str(toy_world), "export": str(export), "out_dir": str(out)})
        for path in out.rglob("*.json"):
            json.loads(path.read_text())  # whatever is there is whole
    result = ch.run_study({"world": str(toy_world), "export": str(export), "out_dir": str(out)})
    assert result["summary"] == reference["summary"]
    for name in ("per_seed/seed0.json",):
        got, want = json.loads((out / name).read_text()), json.loads((tmp_path / "reference" / name).read_text())
        assert got["results"] == want["results"], name
    assert leftovers(out) == []


# ---------------------------------------------------------------- two commands sharing one folder
def together(task: str, args: dict, n: int = 2) -> list[str]:
    """Start ``n`` children at once; their outputs once all have finished (each must succeed)."""
    procs = [subprocess.Popen([sys.executable, "-m", "crash_helpers", task, "-", json.dumps(args)], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]  # fmt: skip
    outputs, left = [], time_budget(300)  # both run at once: one deadline for all
    for proc in procs:
        out, err = proc.communicate(timeout=left())
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def test_two_processes_sharing_a_cache_folder_build_it_once(toy_world, tmp_path):
    """Two training runs of a sweep started together: one builds the cache and the neighbours,
    the other waits and reuses them; both succeed."""
    outputs = together("prepare", {"world": str(toy_world), "cache_dir": str(tmp_path / "cache")})
    assert sorted(o.count("CACHE BUILT") for o in outputs) == [0, 1], outputs
    assert sum(o.count("SEARCHED") for o in outputs) == 1, outputs
    assert leftovers(tmp_path / "cache") == []


def stamp(output: str, word: str) -> float:
    """The time a child printed as ``<word> <time>``."""
    return float(next(line.split()[1] for line in output.splitlines() if line.startswith(f"{word} ")))


def test_two_jobs_sharing_runs_dir_train_each_run_once(tmp_path):
    """Two main jobs / studies started together with one runs_dir: each run is trained once,
    the second process reuses it (before, both trained into the same run folder). Both call
    train_or_reuse after a barrier; the second's call falls inside the 3 s training and returns
    after it: it waited for the run rather than missing it."""
    outputs = together(
        "train_or_reuse", {"runs_dir": str(tmp_path / "runs"), "barrier": str(tmp_path / "barrier"), "parties": 2}
    )
    assert sum(o.count("TRAINED") for o in outputs) == 1, outputs
    trainer = next(o for o in outputs if "TRAINED" in o)
    other = next(o for o in outputs if "TRAINED" not in o)
    trained = next(line for line in trainer.splitlines() if line.startswith("TRAINED"))
    start, end = (float(part.split("=")[1]) for part in trained.split()[1:])
    assert stamp(trainer, "CALLED") <= start < end
    assert stamp(other, "CALLED") < end <= stamp(other, "RETURNED"), outputs  # the two jobs overlapped
    summaries = {line for o in outputs for line in o.splitlines() if line.startswith("SUMMARY")}
    assert len(summaries) == 1, outputs
    assert leftovers(tmp_path / "runs") == []
