"""saferclip-train: fine-tune a CLIP to be safe with one of the three methods, SafeR-CLIP
(method=saferclip, the default), Safe-CLIP (method=safeclip) or HySAC (method=hysac).

    saferclip-train                              # SafeR-CLIP on the toy world
    saferclip-train method=safeclip              # the Safe-CLIP baseline, same code
    saferclip-train experiment=toy_hysac         # HySAC, the main job's run
    saferclip-train -m seed=0,1,2                # a sweep, one run folder per job
    saferclip-train hydra.run.dir=outputs/train/<run> ckpt_path=last   # resume a run

The work is :func:`saferclip.app.engine.fit.train`; a configuration that cannot work stops in
seconds with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
from typing import Any

from ..cli import hydra_command

log = logging.getLogger("saferclip.train")

OPTIONS = {
    "method=NAME": "saferclip | safeclip | hysac (conf/method/<name>.yaml)",
    "experiment=NAME": "a whole recipe, e.g. toy_saferclip, toy_hysac, visu_vitl14 (conf/experiment/)",
    "model=NAME": "the CLIP to fine-tune (conf/model/; model.pretrained=<weights>)",
    "data=NAME": "toy (default), visu or visu_text, with paths.visu=... paths.coco=...",
    "trainer.max_epochs=N": "epochs; trainer=gpu / ddp for a GPU or several",
    "selection.tau=X": "the unsafe rate a kept epoch may have (matched safety; default 0.05)",
    "selection.rank_by=KEY": "what ranks the epochs at most tau unsafe: selection_score (default) or U2V_R@1",
    "ckpt_path=last": "resume the run in hydra.run.dir",
    "dry_run=true": "check config, paths and data formats; train nothing",
    "force=true": "train over a folder that holds checkpoints",
}


def _task(cfg: Any) -> float | None:
    from ..engine.fit import train

    result = train(cfg)
    log.info("result: %s", result)
    score = result.get("best_score")
    return float(score) if score is not None else None


main = hydra_command("saferclip-train", "train", _task, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
