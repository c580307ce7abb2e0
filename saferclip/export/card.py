"""The model card (README.md) of an exported safety-tuned CLIP.

A safety model needs its limits stated next to its numbers: what it was trained to redirect,
on which data it was measured, and what the safety costs on safe inputs (over-defensiveness).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .. import __version__
from .public_names import public_model_name

LIBRARIES = ("open_clip", "transformers")

METHODS = {
    "saferclip": (
        "SafeR-CLIP (proximity-aware redirection, Yousaf et al., 2025): each unsafe caption or "
        "image is redirected to its semantically closest safe alternative, found by nearest-"
        "neighbour search with the frozen original encoders"
    ),
    "safeclip": (
        "Safe-CLIP (rigid redirection, Poppi et al., ECCV 2024): each unsafe caption or image "
        "is pulled towards its own paired safe item"
    ),
    "hysac": (
        "HySAC (hyperbolic safety-aware CLIP, Poppi et al., CVPR 2025): unsafe content is kept "
        "and ordered in the Lorentz model of hyperbolic space, safe content nearer the origin; "
        "retrieval is made safe at query time by the safety traversal"
    ),
}


def model_card(
    arch: str,
    *,
    pretrained: str | None = None,
    method: str | None = None,
    method_config: Mapping[str, Any] | None = None,
    training_data: str | None = None,
    evaluation: str | Mapping[str, Any] | None = None,
    evaluation_data: str | None = None,
    over_defensiveness: str | Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    unsafe_categories: Sequence[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    folder: str | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    limitations: Sequence[str] = (),
    library: str = "open_clip",
    hyperbolic: bool = False,
) -> str:
    """Markdown model card with Hugging Face front matter.

    Args:
        arch: open_clip architecture; ``pretrained``: the base weights (tag or path).
        method: ``saferclip`` / ``safeclip`` (other names are shown as given);
            ``method_config``: its settings, dumped as YAML.
        training_data: what it was fine-tuned on (name, split, size).
        evaluation: a Markdown table, ``{metric: value}``, or ``{model: {metric: value}}``
            (one row per model); ``evaluation_data``: the data and split it was measured on.
        over_defensiveness: the cost on safe inputs (retention of safe recall and zero-shot
            accuracy vs the original model), in the same forms as ``evaluation``.
        selection: which training epoch this is and its validation figures
            (``saferclip.export.run_records.exported_epoch_record``).
        unsafe_categories: the unsafe concepts the redirection was trained on.
        folder / repo_id: shown in the usage snippet (``local-dir:`` / ``hf-hub:``).
        limitations: extra lines for the limitations section.
        library: the export's layout, ``open_clip`` or ``transformers`` (front matter, usage).
        hyperbolic: a HySAC model: the card explains its head file and its two modes.

    The card is meant to be published: the base model is named by its hub id, tag or file name
    (:func:`public_model_name`), never by a local path.
    """
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")
    method_text = METHODS.get((method or "").lower(), method or "not recorded")
    title = name or f"{arch} made safer with {method or 'saferclip'}"
    lines = [
        "---",
        "tags:",
        *(f"- {t}" for t in dict.fromkeys(("clip", library, "safety", "saferclip", *([method] if method else [])))),
        f"library_name: {library}",
        "pipeline_tag: zero-shot-image-classification",
        f"license: {license}",
        "---",
        f"# {title}",
        "",
    ]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "A CLIP model fine-tuned so that unsafe (NSFW, violent, hateful...) text and images are "
        "redirected towards safe meanings while safe inputs keep theirs.",
        "",
        "## Model details",
        "",
        f"- **Architecture:** `{arch}` (open_clip)"
        + (", as transformers' `CLIPModel`" if library == "transformers" else ""),
        f"- **Base model:** {_base(pretrained)}",
        f"- **Fine-tuning method:** {method_text}",
        f"- **Exported by:** saferclip {__version__}",
    ]
    if unsafe_categories:
        lines.append(f"- **Unsafe categories trained on:** {', '.join(unsafe_categories)}")
    if method_config:
        lines += ["", "### Method configuration", "", "```yaml", *yaml_lines(method_config), "```"]
    lines += ["", "## Training data", "", training_data.strip() if training_data else "Not recorded."]
    if selection:
        lines += ["", *_selection_lines(selection)]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        if evaluation_data:
            lines += [f"Measured on: {evaluation_data.strip()}", ""]
        lines += [markdown_table(evaluation)]
    else:
        lines.append("No evaluation results were attached to this export: measure safety and utility before use.")
    lines += ["", "### Over-defensiveness (the cost of safety on safe inputs)", ""]
    if over_defensiveness:
        lines.append(markdown_table(over_defensiveness))
    else:
        lines.append(
            "Not reported. Measure the retention of safe-query retrieval (S→V recall) and of "
            "zero-shot accuracy against the original model before relying on this model."
        )
    usage = _usage_transformers(folder, repo_id) if library == "transformers" else _usage(folder, repo_id)
    lines += ["", "## Usage", "", *(_hyperbolic_lines() if hyperbolic else []), *usage]
    lines += ["", *_intended_use(evaluation_data, limitations)]
    return "\n".join(lines).rstrip() + "\n"


def _hyperbolic_lines() -> list[str]:
    return [
        "**This is a hyperbolic (HySAC) model.** Its towers load in plain open_clip below, but their "
        "outputs are tangent vectors, not unit vectors: the embeddings live in the Lorentz model of "
        "hyperbolic space, and two items are compared by their geodesic distance, not by cosine. "
        "`hyperbolic_head.safetensors` (+ `hyperbolic_head.json`, with its checksum) holds the learnt "
        "curvature, the per-tower scales and the **safe radii**. Two modes:",
        "",
        "- **safe** (the default for retrieval): a query farther from the origin than its modality's "
        "safe radius is moved back along its geodesic to that radius (safety traversal), so an unsafe "
        "query retrieves safe content;",
        "- **moderation**: no traversal: an unsafe query finds unsafe content (what content moderators need).",
        "",
        "The distance of an embedding from the origin is itself an unsafe score (unsafe content lies farther out).",
        "",
        "```python",
        "import saferclip",
        'model = saferclip.load_model("local-dir:./this-folder")  # mode="safe" by default',
        'moderation = saferclip.load_model("local-dir:./this-folder", mode="moderation")',
        'scores = model.similarity(model.encode_text(["a caption"]), model.encode_image(images))',
        "```",
        "",
    ]


def _selection_lines(selection: Mapping[str, Any]) -> list[str]:
    """The "Model selection" section: the exported epoch and its validation figures."""
    epoch, step = selection.get("epoch"), selection.get("global_step")
    monitor, chosen = selection.get("monitor"), selection.get("selected_epoch")
    lines = ["## Model selection", ""]
    line = f"Exported: epoch {epoch}" + (f" (step {step})" if step is not None else "")
    if monitor:
        line += f", chosen by `{monitor}`"
        if selection.get("score") is not None:
            line += f" = {float(selection['score']):.4f}"
    if chosen is not None and chosen != epoch:
        line += f"; the run's selected epoch was {chosen}"
    lines += [line + ".", ""]
    if selection.get("matched_safety"):
        lines += [f"Matched safety: {selection['matched_safety']}.", ""]
    metrics = selection.get("metrics") or {}
    if metrics:
        lines += ["Its validation figures (setting (a): every embedding from this model):", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in metrics.items()]
    return lines


def _usage(folder: str | None, repo_id: str | None) -> list[str]:
    local = f"local-dir:./{folder}" if folder else "local-dir:/path/to/this/folder"
    hub = f"hf-hub:{repo_id}" if repo_id else "hf-hub:<user>/<repo>"
    return [
        "Plain open_clip loads it; saferclip is not needed.",
        "",
        "```python",
        "import open_clip",
        "import torch",
        "from PIL import Image",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{local}")',
        f'tokenizer = open_clip.get_tokenizer("{local}")',
        f'# from the Hugging Face Hub once uploaded: "{hub}"',
        "model.eval()",
        "with torch.no_grad():",
        '    image = preprocess(Image.open("photo.jpg")).unsqueeze(0)',
        '    text = tokenizer(["a photo of a dog"])',
        "    image_features = model.encode_image(image, normalize=True)",
        "    text_features = model.encode_text(text, normalize=True)",
        "```",
    ]


def _usage_transformers(folder: str | None, repo_id: str | None) -> list[str]:
    where = f"./{folder}" if folder else "/path/to/this/folder"
    hub = repo_id or "<user>/<repo>"
    return [
        "Plain transformers loads it; saferclip and open_clip are not needed.",
        "",
        "```python",
        "import html, ftfy, torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer",
        "",
        f'model = CLIPModel.from_pretrained("{where}").eval()  # or "{hub}" once uploaded',
        f'tokenizer = CLIPTokenizer.from_pretrained("{where}")',
        f'processor = AutoImageProcessor.from_pretrained("{where}", backend="pil")  # open_clip\'s exact resize',
        "",
        "def clean(text):  # the cleaning open_clip applied in training; CLIPTokenizer does not",
        '    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())',
        "",
        "with torch.no_grad():",
        '    text = tokenizer([clean("a photo of a dog")], padding=True, truncation=True, return_tensors="pt")',
        '    image = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")',
        "    out = model(**text, **image)",
        "    text_features, image_features = out.text_embeds, out.image_embeds  # L2-normalised",
        "```",
        "",
        "The text tower alone, e.g. as the text encoder of a Stable Diffusion 1.x pipeline (its "
        "hidden width must equal the UNet's `cross_attention_dim`: 768 for ViT-L/14):",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from transformers import CLIPTextModel",
        "",
        f'text_encoder = CLIPTextModel.from_pretrained("{where}")',
        'pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", text_encoder=text_encoder)',
        "```",
        "",
        "Differences from open_clip: without the cleaning above, text that ftfy / HTML unescaping "
        "would change (curly quotes, ligatures, full-width forms, `&amp;`) tokenizes differently; "
        "the tokenizer pads with `<|endoftext|>` where open_clip pads with 0 (the pooled embedding "
        "is the same); transformers' centre crop can sit one pixel off open_clip's on some aspect "
        "ratios, and RGBA images are composited on white (convert to RGB first).",
    ]


def _intended_use(evaluation_data: str | None, extra: Sequence[str]) -> list[str]:
    measured = f"the data stated above ({evaluation_data.strip()})" if evaluation_data else "the data stated above"
    lines = [
        "## Intended use",
        "",
        "- A safer CLIP backbone for research on vision-language safety: retrieval over mixed "
        "galleries, the text encoder of a text-to-image generator, or a captioning model's encoder.",
        "- A component of a wider safety system (with filters, human review and monitoring), not a "
        "safety system by itself.",
        "",
        "## Out-of-scope use",
        "",
        "- Surveillance, identification or profiling of people, and any use that infers sensitive "
        "attributes of individuals.",
        "- Content moderation decisions about people without human review.",
        "- Treating its outputs as a certification that content is safe.",
        "",
        "## Limitations and risks",
        "",
        "- **Not a guarantee of safety.** Redirection lowers how often unsafe inputs match unsafe "
        "content; it does not remove unsafe concepts from the model, and adversarial or paraphrased "
        "prompts may still retrieve or generate unsafe content.",
        "- **Learned on specific unsafe categories.** The redirection covers the categories and data "
        "it was trained on; unsafe concepts outside them may pass unchanged.",
        "- **Over-defensiveness.** The model may treat safe content as unsafe (redirect or degrade "
        "safe queries); check the over-defensiveness figures above against your use.",
        f"- **Measured only where stated.** The figures hold for {measured}; results on toy or "
        "synthetic data do not carry over to real images and text. Evaluate on your own data.",
        "- **Inherited biases.** The base CLIP's social biases and the biases of the training data "
        "(including which content was labelled unsafe) remain.",
    ]
    lines += [f"- {line.strip()}" for line in extra]
    return lines


def markdown_table(data: str | Mapping[str, Any]) -> str:
    """A Markdown table from ``{metric: value}`` or ``{row: {metric: value}}`` (a string passes through)."""
    if isinstance(data, str):
        return data.strip()
    if not data:
        return ""
    if all(isinstance(v, Mapping) for v in data.values()):
        columns: list[str] = []
        for row in data.values():
            columns += [c for c in row if c not in columns]
        out = ["| model | " + " | ".join(map(_cell, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
        for key, row in data.items():
            out.append(f"| {_cell(key)} | " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
        return "\n".join(out)
    out = ["| metric | value |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in data.items()]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _base(pretrained: str | None) -> str:
    if not pretrained:
        return "not recorded"
    if pretrained == "random":
        return "none (random initialisation)"
    return f"`{public_model_name(pretrained)}`"


class _CardDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string a YAML 1.2 reader (OmegaConf) would take for
    a number (``1e-3``), and writing lists inline (``[text, image]``)."""


_CardDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_CardDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def _plain(value: Any) -> Any:
    """Config-like data as YAML's types: dataclasses and mappings as dicts, tuples as lists,
    anything else that is not a YAML scalar (a path, an enum) as its text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def yaml_lines(obj: Any) -> list[str]:
    """Config-like data (mappings, dataclasses, lists, scalars) as YAML lines: block mappings
    in their order, lists inline. Written by PyYAML, so it parses back to the same data."""
    data = _plain(obj)
    if not data:
        return []
    text = yaml.dump(
        data, Dumper=_CardDumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000
    )
    return text.splitlines()
