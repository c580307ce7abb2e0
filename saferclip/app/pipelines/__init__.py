"""Work made of several training runs, each composed from the one config tree.

:mod:`.runs` (compose, run keys, the done marker, train-or-reuse, the main job's run registry,
the split of a command line between a pipeline's own keys and its runs'), :mod:`.main_job`
(the three methods against the original on the toy world), :mod:`.study` (seeds and
ablations), :mod:`.tune` and :mod:`.tune_report` (the hyperparameter search and what it
writes), :mod:`.rehearse` (the real-size recipe, stage by stage).
"""
