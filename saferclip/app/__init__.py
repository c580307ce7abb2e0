"""The Lightning/Hydra shell over the library: three rooms and what they share.

* :mod:`.engine`: training: the LightningModules, the DataModule, callbacks, loggers, and
  :mod:`.engine.fit` (the checks, the dry run, the Trainer, the fit and what follows it).
* :mod:`.pipelines`: work made of several runs: :mod:`.pipelines.runs` (composing the config
  tree, run folders reused when finished, the main job's run registry), then the main job,
  the study, the hyperparameter search and the rehearsal.
* :mod:`.commands`: one thin module per console script (``saferclip-<name>``), importing the
  engine and the pipelines, never another command.

Shared by all three: :mod:`.cli` (exit codes, one-line errors, ``--help``),
:mod:`.hydra_utils` (the config tree, its checks, logging) and :mod:`.overrides` (every
command line checked against its config before any work). Nothing here is imported by the
library.
"""
