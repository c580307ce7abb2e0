"""docs/GPU.md's scale figures are generated regions of the one docs mechanism
(saferclip.redirection.scale_summary through saferclip.evaluation.doc_tables): the growth and
IVF tables from small hand-made result files, figures and fits computed here by hand; the
pending text while the files are not committed; the growth plot drawn with its stamp, redrawn
for a new file and shown only when it was drawn from the committed one."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from saferclip.evaluation.doc_tables import (
    GROWTH_PLOT,
    GROWTH_PLOT_STAMP,
    RESULTS_DIR,
    DocTableError,
    check_documents,
    main,
    update_documents,
)
from saferclip.redirection.large_pool import PoolIndexConfig
from saferclip.redirection.scale_summary import build_seconds, stage_fit

DEFAULT = {"nprobe": PoolIndexConfig.nprobe, "candidates": PoolIndexConfig.candidates}
CONFIGURATION = {
    "date": "2026-12-07T04:00:00+00:00",
    "cpus": 2,
    "cpu": "Test CPU",
    "memory_gb": 24.0,
    "threads": 2,
    "faiss": "1.0",
}
ARGUMENTS = {
    "dim": 512,
    "shard_rows": 1_000_000,
    "topics": 1000,
    "subtopics": 100,
    "m": 64,
    "nbits": 4,
    "coarse": "flat",
    "queries": 2000,
}


def size(n: int, stages: dict, peaks: tuple, default: tuple, load: tuple) -> dict:
    """One measured size; the default search (recall@1, recall@10, queries/s) listed second, so
    that the tables must find it by its setting, not by its place."""
    return {
        "size": n,
        "nlist": int(math.sqrt(n)),
        "build_seconds": sum(stages.values()),
        "stage_seconds": stages,
        "index_bytes_per_vector": 40.0,
        "store_bytes_per_vector": 1024.0,
        "peak_gb_after_build": peaks[0],
        "peak_gb_after_search": peaks[1],
        "exact_queries_per_second": 12.5,
        "searches": [
            {"nprobe": 8, "candidates": 64, "recall_at_1": 0.5, "recall_at_10": 0.4, "queries_per_second": 2000.0},
            {**DEFAULT, "recall_at_1": default[0], "recall_at_10": default[1], "queries_per_second": default[2]},
        ],
        "load_average_before": load[0],
        "load_average_after": load[1],
    }


# two sizes: k-means 12 -> 22 s (2 s + 1e-5 s per vector), assignment 40 s at 1M and 40 * 2**1.5
# at 2M (4e-8 s per N**1.5), encoding 30 -> 60 s and reading 20 -> 40 s (per vector, no intercept)
ASSIGNMENT_2M = 40 * 2**1.5
POOL = {
    "configuration": CONFIGURATION,
    "arguments": ARGUMENTS,
    "sizes": [  # out of order: the tables sort them
        size(
            2_000_000,
            {"coarse_training": 22.0, "assignment": ASSIGNMENT_2M, "encoding": 60.0, "reading": 40.0},
            (1.4, 1.5),
            (0.96, 0.91, 650.0),
            (0.7, 0.8),
        ),
        size(
            1_000_000,
            {"coarse_training": 12.0, "assignment": 40.0, "encoding": 30.0, "reading": 20.0},
            (1.0, 1.2),
            (0.98, 0.95, 900.0),
            (0.5, 0.7),
        ),
    ],
}
SPEEDUP = {"min": 4.5, "median": 5.0, "max": 5.5}
IVF = {
    "configuration": {
        **CONFIGURATION,
        "faiss_build": "AVX2 ",
        "torch": "2.0",
        "torch_blas": "mkl",
        "numpy_blas": "openblas",
        "OPENBLAS_CORETYPE": "auto",
        "OMP_NUM_THREADS": "unset",
    },
    "arguments": {"queries": 10_000, "dim": 768, "repeats": 3, "target_recall": 0.99},
    "runs": [
        {
            "threads": 1,
            "load_average_before": 0.2,
            "load_average_after": 0.3,
            "sizes": [
                {
                    "pool": 100_000,
                    "exact_faiss_seconds": {"min": 0.5, "median": 0.6, "max": 0.7},
                    "exact_torch_seconds": {"min": 0.8, "median": 0.9, "max": 1.0},
                    "first_call_seconds": {"exact_faiss": 0.9, "exact_torch": 1.1},
                    "approximate": [
                        {
                            "index": "ivf",
                            "params": "nlist=1264 nprobe=4",
                            "search_seconds": {"min": 0.1, "median": 0.12, "max": 0.15},
                            "speedup_vs_faiss_exact": SPEEDUP,
                            "speedup_vs_torch_exact": {"min": 6.0, "median": 7.5, "max": 8.0},
                            "recall_at_1": 0.995,
                            "first_call_seconds": 0.2,
                        }
                    ],
                    "ivf_at_target_recall": {
                        "params": "nlist=1264 nprobe=4",
                        "recall_at_1": 0.995,
                        "speedup_vs_faiss_exact": SPEEDUP,
                        "speedup_vs_torch_exact": {"min": 6.0, "median": 7.5, "max": 8.0},
                    },
                }
            ],
        }
    ],
}
GPU = """# GPU

Kept as written.

<!-- generated:pool-growth -->
<!-- /generated -->

<!-- generated:pool-settings -->
<!-- /generated -->

<!-- generated:pool-plot -->
<!-- /generated -->

<!-- generated:pool-projection -->
<!-- /generated -->

<!-- generated:ivf-speedup -->
<!-- /generated -->
Kept as written too.
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/RESULTS.md", "docs/ROBUSTNESS.md", "docs/ANALYSIS.md"):
        (tmp_path / name).write_text("# no generated region\n")
    (tmp_path / "docs" / "GPU.md").write_text(GPU)
    return tmp_path


def region(text: str, name: str) -> str:
    return text.split(f"<!-- generated:{name} -->\n", 1)[1].split("<!-- /generated -->", 1)[0]


def test_before_measuring_every_region_says_so_and_names_the_command(repo):
    assert not (repo / RESULTS_DIR).exists()
    update_documents(repo)
    text = (repo / "docs" / "GPU.md").read_text()
    for name in ("pool-growth", "pool-settings", "pool-projection", "ivf-speedup"):
        assert region(text, name).startswith(
            "*Not yet measured"
        ) and "`bash scripts/run_scale_benchmarks.sh`" in region(text, name)
    assert "`docs/results/large_pool_growth.json`" in region(text, "pool-growth")
    assert "`docs/results/ivf_100k.json`" in region(text, "ivf-speedup")
    assert region(text, "pool-plot") == ""  # no picture
    assert not (repo / GROWTH_PLOT).exists()
    assert text.startswith("# GPU\n\nKept as written.") and text.endswith("Kept as written too.\n")
    assert check_documents(repo) == []


def test_the_fit_through_two_sizes_is_the_line_through_them():
    fits = stage_fit(sorted(POOL["sizes"], key=lambda s: s["size"]))

    def line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
        slope = (y2 - y1) / (x2 - x1)
        return y1 - slope * x1, slope

    by_hand = {
        "coarse_training": (*line(1e6, 12, 2e6, 22), 1.0),
        "encoding": (*line(1e6, 30, 2e6, 60), 1.0),
        "reading": (*line(1e6, 20, 2e6, 40), 1.0),
        "assignment": (*line(1e9, 40, 2e6**1.5, ASSIGNMENT_2M), 1.5),
    }
    assert set(fits) == set(by_hand)
    for name, (a, c, power) in by_hand.items():
        assert fits[name] == pytest.approx((a, c, power), rel=1e-6, abs=1e-9), name
    assert by_hand["coarse_training"][:2] == pytest.approx((2.0, 1e-5))
    assert by_hand["assignment"][:2] == pytest.approx((0.0, 4e-8), abs=1e-9)
    # at 100 M: 2 + 1e-5 * 1e8 (k-means) + 3e-5 * 1e8 (encoding) + 2e-5 * 1e8 (reading) + 4e-8 * 1e12 (assignment)
    assert build_seconds(fits, 1e8) == pytest.approx(1002 + 3000 + 2000 + 40_000)


def test_the_growth_and_ivf_tables_from_hand_made_files(repo, tmp_path):
    pool, ivf = tmp_path / "pool.json", tmp_path / "ivf.json"
    pool.write_text(json.dumps(POOL))
    ivf.write_text(json.dumps(IVF))
    assert main(["--from", f"pool={pool}", "--from", f"ivf={ivf}", "--root", str(repo)]) == 0
    text = (repo / "docs" / "GPU.md").read_text()
    rows = [line for line in region(text, "pool-growth").splitlines() if line.startswith("| ")]
    assert rows[0].endswith(
        f"| recall@1 / @10 (nprobe {DEFAULT['nprobe']}, {DEFAULT['candidates']} candidates) | queries/s | "
        "exact scan queries/s | load |"
    )
    # build 12 + 40 + 30 + 20 = 102 s for 1 M vectors: 102.0 s per million; the default search's figures
    assert (
        rows[1]
        == "| 1M | 1,000 | 102 s | 12 / 40 / 30 / 20 s | 102.0 | 40.0 | 1024 | 1.00 / 1.20 | 0.9800 / 0.9500 | 900 | 12.5 | 0.5-0.7 |"
    )
    # 22 + 113.1 + 60 + 40 = 235.1 s = 3.9 min for 2 M: 117.6 s per million
    assert (
        rows[2]
        == "| 2M | 1,414 | 3.9 min | 22 / 113 / 60 / 40 s | 117.6 | 40.0 | 1024 | 1.40 / 1.50 | 0.9600 / 0.9100 | 650 | 12.5 | 0.7-0.8 |"
    )
    assert (
        "`python scripts/bench_large_pool.py --sizes 1000000,2000000` (`docs/results/large_pool_growth.json`)" in text
    )
    settings = region(text, "pool-settings").splitlines()
    assert settings[0] == "Every search setting at 2M:"
    assert settings[4:] == [
        "| 8 | 64 | 0.5000 | 0.4000 | 2,000 |",
        f"| {DEFAULT['nprobe']} | {DEFAULT['candidates']} | 0.9600 | 0.9100 | 650 |",
    ]
    projection = region(text, "pool-projection")
    # peak memory 1.2 GB at 1 M, 1.5 GB at 2 M: 0.9 GB + 0.3 GB per million = 300 bytes per vector
    assert "(0.90 GB + 300 bytes per vector)" in projection and "largest size's 40.0 bytes/vector" in projection
    # 100 M: 46,002 s = 12.8 h, assignment 40,000 s = 11.1 h, index 40 * 1e8 = 4.0 GB, store 1024 * 1e8 = 0.10 TB,
    # peak 0.9 + 30 = 30.9 GB: over 8 GB and the 24 GB machine; shards of the fitted 30 GB under 8 - 0.9: ceil(4.2) = 5
    assert (
        "| 100M | 12.8 h | 11.1 h | 4.0 GB | 0.10 TB | 30.9 GB | over the 8 GB target and the measuring machine's 24 GB: "
        "a sharded build, 5 shards of 20M"
    ) in projection
    assert (
        region(text, "pool-plot")
        == "![Growth of the large safe pool: build time, memory and search against pool size, measured and "
        "projected](img/large_pool_growth.png)\n"
    )
    speedup = region(text, "ivf-speedup")
    assert (
        "| 1 | 0.2-0.3 | ivf | nlist=1264 nprobe=4 | 0.10 / 0.12 / 0.15 | 4.5 / 5.0 / 5.5x | 6.0 / 7.5 / 8.0x | 0.9950 | 0.20 |"
        in speedup
    )
    assert (
        "- 1 thread(s), pool 100k: the fastest IVF setting at recall@1 >= 0.99 is nlist=1264 nprobe=4 (recall 0.9950): **5.0x** the "
        "exact FAISS search (median; min 4.5x, max 5.5x), 7.5x torch's."
    ) in speedup
    assert "Not yet measured" not in text and check_documents(repo) == []


def test_the_plot_is_drawn_with_its_stamp_and_redrawn_for_a_new_file(repo, tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(POOL))
    main(["--from", f"pool={pool}", "--root", str(repo)])
    picture = repo / GROWTH_PLOT
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((repo / GROWTH_PLOT_STAMP).read_text())["results_sha256"]
        == hashlib.sha256((repo / RESULTS_DIR / "large_pool_growth.json").read_bytes()).hexdigest()
    )
    assert "Not yet measured" in region(
        (repo / "docs" / "GPU.md").read_text(), "ivf-speedup"
    )  # one file, the other pending
    # a new pool file committed without regenerating: the check names the tables and the plot (not drawn from it)
    changed = json.loads(json.dumps(POOL))
    changed["sizes"][1]["searches"][1]["queries_per_second"] = 950.0
    (repo / RESULTS_DIR / "large_pool_growth.json").write_text(json.dumps(changed))
    differ = [r.split("generated:")[1] for r in check_documents(repo)]
    assert differ == ["pool-growth", "pool-plot"]
    picture.write_bytes(b"an old picture")
    changes = update_documents(repo)
    assert changes[0] == "docs/img/large_pool_growth.png (drawn from its result file)"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and check_documents(repo) == []
    assert "| 950 |" in region((repo / "docs" / "GPU.md").read_text(), "pool-growth")
    assert update_documents(repo) == []  # drawn once per file


def test_a_wrong_or_incomplete_file_is_one_line(repo, tmp_path, capsys):
    ivf = tmp_path / "ivf.json"
    ivf.write_text(json.dumps(IVF))
    assert main(["--from", f"pool={ivf}", "--root", str(repo)]) == 2
    assert "not a pool result file (it has no 'sizes' section)" in capsys.readouterr().err
    broken = json.loads(json.dumps(IVF))
    del broken["runs"][0]["sizes"][0]["exact_torch_seconds"]
    (repo / RESULTS_DIR).mkdir(parents=True)
    (repo / RESULTS_DIR / "ivf_100k.json").write_text(json.dumps(broken))
    with pytest.raises(
        DocTableError,
        match=r"docs/GPU.md: region generated:ivf-speedup: the result file has no field 'exact_torch_seconds'",
    ):
        check_documents(repo)
