"""Generate the README's and docs/RESULTS.md's result tables and quoted figures from the committed
result files under docs/results/ (saferclip.evaluation.doc_tables).

    python scripts/update_doc_tables.py                                          # rewrite the generated regions
    python scripts/update_doc_tables.py --check                                  # exit 1 naming each region that differs
    python scripts/update_doc_tables.py --from outputs/main/report/results.json  # copy a new main result in first
    python scripts/update_doc_tables.py --from study=outputs/study/study.json    # the study's
"""

import sys

from saferclip.evaluation.doc_tables import main

if __name__ == "__main__":
    sys.exit(main())
