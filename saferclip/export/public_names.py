"""Names fit to publish: a model card, an export's provenance or a generation record names
models and files without the local paths of the machine that made them.

* :func:`public_model_name` — a base model by its hub id, open_clip tag or file name;
* :func:`public_path` — a local path relative to a folder the reader has (the run, the
  repository), else by its name;
* :func:`public_config` — a config with every absolute path made public.

Used by the model card (:mod:`.card`), the export's records (:mod:`.run`, :mod:`.open_clip`,
:mod:`.hf`, :mod:`.evaluation_card`) and the records of :mod:`saferclip.downstream`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from ..model.checkpoints import WEIGHT_SUFFIXES


def _is_local_path(value: str) -> bool:
    return (
        value.startswith(("/", "~", "./", "../", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", value))
        or PurePath(value).suffix in WEIGHT_SUFFIXES
        or ("/" in value and not value.startswith(("hf-hub:", "local-dir:")))
    )


def public_model_name(value: str | None) -> str | None:
    """A base model as a published card may name it: an open_clip tag (``openai``) or a hub id
    (``hf-hub:org/name``) as given; a local file or folder by its name only
    (``/home/me/data/toy_base.safetensors`` -> ``toy_base.safetensors``); ``local-dir:PATH``
    -> the folder's name. open_clip tags never hold a ``/``; anything with one that is not a
    hub id is a path (as :func:`saferclip.model.build.build_clip` reads it)."""
    if value is None:
        return None
    value = str(value)
    if value.startswith("local-dir:"):
        return _name(value[len("local-dir:") :]) or value
    if value.startswith("hf-hub:") or not _is_local_path(value):
        return value
    return _name(value) or value


def _name(path: str) -> str:
    path = path.rstrip("/\\")
    return (PureWindowsPath(path) if "\\" in path else PurePath(path)).name


def public_path(value: str | os.PathLike, roots: Iterable[str | os.PathLike | None] = ()) -> str:
    """A local path as a published card may show it: relative to the first of ``roots`` that
    holds it (the run folder, the repository), else ``…/<name>``. Relative paths, hub ids and
    anything that is not a local path pass through."""
    text = str(value)
    if not text.startswith(("/", "~")) and not re.match(r"^[A-Za-z]:[\\/]", text):
        return text
    path = Path(text).expanduser()
    for root in roots:
        if root is None:
            continue
        root = Path(root).expanduser()
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        return rel.as_posix() if str(rel) != "." else root.name
    return f"…/{path.name}" if path.name else "…"


def public_config(obj: Any, roots: Iterable[str | os.PathLike | None] = ()) -> Any:
    """``obj`` (a config: mappings, lists, scalars) with every absolute path string replaced by
    :func:`public_path`, for a card or a provenance file meant to be published."""
    roots = list(roots)
    if isinstance(obj, Mapping):
        return {k: public_config(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_config(v, roots) for v in obj]
    if isinstance(obj, str):
        return public_path(obj, roots)
    return obj
