"""The errors a user can fix: bad data, bad files, bad configuration.

Every console script reports these in one line naming the file, row, field or key and exits
with code 2 (:mod:`saferclip.app.cli`); anything else is a bug and exits 1 with its
traceback. Each subclass is also a ``ValueError``, what library callers expect of bad input.
"""

from __future__ import annotations


class SaferclipError(ValueError):
    """Input the user can fix; the message says what and where."""


class ConfigError(SaferclipError):
    """A configuration that cannot work, caught before any long work starts."""


class SummaryError(SaferclipError):
    """A result file or a document's marker a docs generator cannot use (one line naming it)."""
