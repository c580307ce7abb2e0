"""One module per console script (``saferclip-<name>`` is :mod:`saferclip.app.commands.<name>`;
``saferclip-eval`` is :mod:`.evaluate`, ``saferclip-main`` :mod:`.main_job`): the command line,
its ``--help`` and its exit codes, over the engine and the pipelines. A command imports no other
command (``tests/test_layout.py`` checks it), and nothing heavy before it runs: ``--help``
imports neither torch nor open_clip.
"""
