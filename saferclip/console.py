"""What the console scripts write and where: fit for a terminal and for a log file.

On a terminal the commands show progress bars. When standard output (or standard error,
where the bars go) is not a terminal — ``saferclip-main > log``, a CI job, a batch system —
there are no per-step bars: training logs one line per epoch instead
(:class:`saferclip.app.engine.callbacks.EpochLine`), and the commands print their final table last.
"""

from __future__ import annotations

import os
import sys


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def interactive() -> bool:
    """Standard output and standard error are both terminals (``SAFERCLIP_PROGRESS=1`` / ``0``
    forces the answer)."""
    forced = os.environ.get("SAFERCLIP_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def show_progress(progress: bool | None = None) -> bool:
    """Whether a progress bar is shown: never when ``progress`` is False or the output is not
    a terminal (:func:`interactive`), otherwise yes."""
    return progress is not False and interactive()
