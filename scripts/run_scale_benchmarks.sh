#!/usr/bin/env bash
# The measured set behind docs/GPU.md's scale sections, for a quiet window (nothing else on the
# cores: every figure is a timing). Measures IVF against exact search at 100k (one and two
# threads, three repetitions each) into outputs/scale/ivf_100k.json and the large safe pool built
# and searched at 1, 2, 5 and 10 M into outputs/scale/large_pool_growth.json; each, once measured,
# is copied into docs/results by scripts/update_doc_tables.py --from, which regenerates docs/GPU.md's
# regions (and draws docs/img/large_pool_growth.png from the pool's file). The log goes to outputs/.
#
#   bash scripts/run_scale_benchmarks.sh            # PYTHON=... to choose the interpreter
#
# Needs ~11 GB free under /tmp (the 10 M pool's float16 shards, removed at the end) and ~4 GB
# of memory. About an hour on the 2-core machine (measured with other jobs on the cores: the
# IVF part ~25 min, the growth run ~45 min, of which ~15 min generating the 10 M pool).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
free_gb=$(df -BG --output=avail /tmp | tail -1 | tr -dc '0-9')
if [ "$free_gb" -lt 12 ]; then
  echo "run_scale_benchmarks: /tmp has ${free_gb} GB free, the 10 M pool needs ~11 GB" >&2
  exit 2
fi
mkdir -p outputs/scale
log=outputs/scale_benchmarks_$(date -u +%Y%m%dT%H%M%SZ).log
{
  echo "start $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PYTHON" scripts/bench_neighbours.py --sizes 100000 --compare-size 0 --approx ivf --threads 1,2 \
    --nlist 316,1264,2528 --nprobe 2,4,8,16 --repeats 3 --json outputs/scale/ivf_100k.json
  "$PYTHON" scripts/update_doc_tables.py --from ivf=outputs/scale/ivf_100k.json
  "$PYTHON" scripts/bench_large_pool.py --sizes 1000000,2000000,5000000,10000000 --queries 2000 \
    --json outputs/scale/large_pool_growth.json
  "$PYTHON" scripts/update_doc_tables.py --from pool=outputs/scale/large_pool_growth.json
  echo "end $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$log"
