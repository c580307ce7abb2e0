#!/usr/bin/env bash
# The experiments behind docs/ROBUSTNESS.md, end to end, then the page regenerated from them.
# Hours on a 2-core CPU (each training run with the main job's schedule; the adversarial ones
# cost about 2-3x a clean one). Every step reuses what a previous call finished (training runs
# by their config, as saferclip-main does), so the script can be stopped and started again.
#
#   bash scripts/robustness_experiments.sh              # sweep on world 0, choose epsilon, world 1, attack, collect
#   EPSILON=8 bash scripts/robustness_experiments.sh    # skip the choice: train the _adv runs at 8/255
#
# Step 1 reads only world 0's validation split; steps 2-3 train and test on world 1 (never used
# for any choice). The chosen epsilon is the smallest swept budget whose SafeR-CLIP run meets the
# robustness targets on validation (evade at 8/255 <= 10%, phrasing search <= 20%), else the one
# with the lowest evade success (printed, and recorded with the results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/robustness
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

SWEEP="python scripts/robustness_sweep.py --world 0 --methods saferclip,hysac --epsilons 0,2,4,8 --out $OUT/sweep.json"
if [ -z "${EPSILON:-}" ]; then
  $SWEEP
  # the rule, with its tests: saferclip.robustness.sweep_summary.choose_epsilon (SafeR-CLIP's targets)
  EPSILON=$(python -c 'import json, sys
from saferclip.robustness.sweep_summary import choose_epsilon
print("%g" % choose_epsilon(json.load(open(sys.argv[1])), "saferclip")[0])' "$OUT/sweep.json")
fi
echo "adversarial training budget: $EPSILON/255"

MAIN="saferclip-main adversarial=true adversarial_overrides=[\"method.adversarial.epsilon_255=$EPSILON\"]"
# the same command as a shell reads it (recorded with the results, so it can be pasted as it is)
MAIN_SHOWN="saferclip-main adversarial=true 'adversarial_overrides=[\"method.adversarial.epsilon_255=$EPSILON\"]'"
ATTACK="saferclip-attack data.toy_seed=1 out_dir=$OUT/attack force=true"
$MAIN --quiet > "$OUT/main_table.md"
$ATTACK > "$OUT/attack_table.md"
python scripts/bench_adversarial_step.py --steps 10 --json "$OUT/step_cost.json"
python scripts/bench_monitor.py --toy data/toy-world1 --json "$OUT/monitor_cost.json"
python scripts/robustness_results.py --attack "$OUT/attack/attack.json" --main outputs/main/report/results.json \
  --sweep "$OUT/sweep.json" --step-cost "$OUT/step_cost.json" --monitor-cost "$OUT/monitor_cost.json" \
  --command "sweep=$SWEEP" --command "main=$MAIN_SHOWN" --command "attack=$ATTACK" --command "epsilon=$EPSILON"
python scripts/update_doc_tables.py
