"""Generate the documents' result tables, quoted figures and plots (README.md, docs/RESULTS.md,
docs/ROBUSTNESS.md, docs/ANALYSIS.md, docs/GPU.md) from the committed result files under docs/results/
(saferclip.evaluation.doc_tables).

    python scripts/update_doc_tables.py                                          # rewrite the generated regions
    python scripts/update_doc_tables.py --check                                  # exit 1 naming each region that differs
    python scripts/update_doc_tables.py --from outputs/main/report/results.json  # copy a new main result in first
    python scripts/update_doc_tables.py --from study=outputs/study/study.json    # the study's
    python scripts/update_doc_tables.py --from pool=outputs/scale/large_pool_growth.json --from ivf=outputs/scale/ivf_100k.json
                                                     # the scale benchmarks' (scripts/run_scale_benchmarks.sh); draws the growth plot
"""

import sys

from saferclip.evaluation.doc_tables import main

if __name__ == "__main__":
    sys.exit(main())
