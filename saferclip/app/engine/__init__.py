"""Training: what ``saferclip-train``, the pipelines and the benchmarks fit a model with.

:mod:`.fit` (:func:`~saferclip.app.engine.fit.train`: check, build, fit, post-fit steps; HySAC's
safe radii), :mod:`.module` (the LightningModule of SafeR-CLIP and Safe-CLIP), :mod:`.hysac_module`
(HySAC's), :mod:`.datamodule` (the DataModule: cache, targets, loaders), :mod:`.callbacks`
(selection record, warm-up early stopping, the per-epoch line) and :mod:`.loggers` (a CSV logger
that survives a resume). Imports nothing on its own: a command's ``--help`` stays quick.
"""
