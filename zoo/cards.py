"""Recipe cards: one Markdown page per catalogue entry, generated from its model YAML, its card source and
`zoo.param_counts`.

A card source (``docs/cards/<name>.yaml``, strict like every zoo config) holds what a YAML model config cannot: a
hand-written summary, the published training stages, hardware and time, reference scores with their source, the
published parameter counts, and what the zoo builds differently from the release. Everything else on the card is
derived: the architecture from ``configs/models/<name>.yaml``, total/active parameters counted on the meta device,
the published counts checked against them (``published_checks``, which the catalogue tests assert too).

>>> print(zoo.cards.render_card("moe-llava-phi2-2.7b-4e"))
>>> zoo.cards.write_cards("docs/cards")   # what `zoo card --all --out docs/cards` does
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from zoo.config import ConfigError, ModelConfig, VisionConfig, from_dict, read_mapping

PARTS = ("vision", "connector", "lm", "all")


@dataclass
class Stage:
    """One published training stage; values are text as the source states them (``2e-5``, ``32/GPU x 8``)."""

    name: str
    trained: str
    data: str
    lr: str = ""
    frozen: str = ""
    batch: str = ""
    epochs: str = ""


@dataclass
class PublishedCount:
    """A parameter count the source publishes, checked against the zoo's count of the same part.

    ``rounding``: ``nearest`` (within ``tolerance``, 2% by default) or ``truncated`` (the source cut the figure to
    ``precision``, by default one decimal of a billion: 2.06B printed as "2.0B", so the count must lie in
    [value, value + precision)). ``without_embeddings``: the source leaves the LM's token embeddings and output head
    out (GLM's activated count), so they are taken off the zoo's count before comparing.
    """

    part: Literal["vision", "connector", "lm", "all"]
    kind: Literal["total", "active"]
    value: float
    source: str
    rounding: Literal["nearest", "truncated"] = "nearest"
    tolerance: float = 0.02
    precision: float = 1e8
    without_embeddings: bool = False


@dataclass
class CardSource:
    """The hand-written half of a card (see the module docstring)."""

    title: str
    summary: str
    base: str | None = None  # another card source whose fields this one inherits (MoE-LLaVA's variants share stages)
    paper: str = ""
    code: str = ""
    stages: list[Stage] = field(default_factory=list)
    training: str = ""  # what every stage shares: schedule, precision, sequence length, parallelism
    hardware: str = ""
    scores: dict[str, float | str] = field(default_factory=dict)
    scores_source: str = ""
    published: list[PublishedCount] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)  # what the zoo entry builds differently, and why
    reproduce: list[str] = field(default_factory=list)  # commands that train or run it here


def cards_dir() -> Path:
    """Card sources: ``$ZOO_CARDS`` or the repository's ``docs/cards`` (each ``<name>.yaml`` beside its generated
    ``<name>.md``)."""
    return Path(os.environ.get("ZOO_CARDS", Path(__file__).resolve().parent.parent / "docs" / "cards"))


def card_name(name: str) -> str:
    """The card source a catalogue entry uses: its own, or the real-size entry's for a ``-tiny`` twin."""
    from zoo.catalogue import twin_of

    return twin_of(name) or name


def read_card(name: str) -> CardSource:
    """The card source of catalogue entry `name` (a twin reads its real-size entry's); errors name the file."""
    path = cards_dir() / f"{card_name(name)}.yaml"
    try:
        return from_dict(CardSource, _card_mapping(path, seen=()))
    except ConfigError as e:
        raise e if str(e).startswith(str(path)) else ConfigError(f"{path}: {e}") from e


def _card_mapping(path: Path, seen: tuple[Path, ...]) -> dict:
    """A card source's mapping with its ``base`` card's fields filled in (recursively)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no card source")
    data = read_mapping(path)
    base = data.get("base")
    if base is None:
        return data
    base_path = path.parent / f"{base}.yaml"
    if base_path in seen or base_path == path:
        raise ConfigError(f"{path}: base: {base!r} inherits from itself")
    return {**_card_mapping(base_path, (*seen, path)), **data}


# ---------------------------------------------------------------------------------------------------------------
# One-line descriptions of an entry's parts (`zoo list` and the cards share them)


def _vision_text(v: VisionConfig) -> str:
    name = v.expert or v.name or v.kwargs.get("model_type") or v.kind
    size = v.image_size or v.kwargs.get("image_size") or v.kwargs.get("img_size")
    text = f"{name}@{size}" if size else name
    text += f" S2{v.scales}" if v.scales else ""
    return text + (f" MoE({_moe_text(v.sparsity.moe)})" if v.sparsity is not None else "")


def _moe_text(moe: dict, default_experts: int = 4, default_k: int = 2) -> str:
    text = f"{moe.get('num_experts', default_experts)}e top-{moe.get('top_k', default_k)}"
    return text + (f" +{moe['num_shared']} shared" if moe.get("num_shared") else "")


def part_summary(config: ModelConfig) -> dict[str, str]:
    """``vision``, ``connector``, ``lm`` and ``sparsity`` of a config as short text."""
    if config.transformers is not None:
        from zoo.families.spec import config_summary

        return config_summary(config.transformers.config)
    vision = " + ".join(_vision_text(v) for v in config.vision_experts)
    connector = config.connector.kind if config.connector.kind != "mlp" else config.connector.projector
    if config.connector.kind in ("moe_mlp", "mocha"):
        connector += f" ({_moe_text(config.connector.moe)})"
    lm_cfg = config.lm.config
    lm = config.lm.name or (f"{lm_cfg.get('model_type', '?')} d{lm_cfg.get('hidden_size', '?')}"
                            f"x{lm_cfg.get('num_hidden_layers', '?')}")
    sparsity = "dense"
    policy = config.lm.sparsity
    if policy is not None:
        layers = policy.layers if isinstance(policy.layers, str) else ",".join(map(str, policy.layers))
        kind = "modality " if policy.modality_routing else "bigmac " if policy.bigmac_ratio else ""
        sparsity = f"{policy.preset or 'custom'}: {layers}, {kind}{_moe_text(policy.moe)}"
    return {"vision": vision, "connector": connector, "lm": lm, "sparsity": sparsity}


def billions(n: float) -> str:
    """A parameter count as people write it: ``3.62B``, ``20.98M``, ``129,696``."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


# ---------------------------------------------------------------------------------------------------------------
# Published counts vs the zoo's


@dataclass(frozen=True)
class CountCheck:
    """A published count, the zoo's count of the same part, and whether they agree."""

    published: PublishedCount
    counted: int

    @property
    def ok(self) -> bool:
        p = self.published
        if p.rounding == "truncated":
            return p.value <= self.counted < p.value + p.precision
        return math.isclose(self.counted, p.value, rel_tol=p.tolerance)

    def __str__(self) -> str:
        p = self.published
        rule = f"truncated to {p.precision / 1e9:g}B" if p.rounding == "truncated" else f"within {p.tolerance:.1%}"
        what = f"{p.part} {p.kind}" + (" without embeddings" if p.without_embeddings else "")
        return (f"{what}: published {billions(p.value)}, counted {billions(self.counted)} "
                f"({self.counted / p.value - 1:+.1%}; {rule}) {'ok' if self.ok else 'MISMATCH'}")


def published_checks(name: str) -> list[CountCheck]:
    """The card's published counts of real-size entry `name` against `zoo.param_counts` (meta device, cached)."""
    from zoo.params import cached_param_counts

    counts = cached_param_counts(name)
    checks = []
    for p in read_card(name).published:
        total, active = (counts.total, counts.active) if p.part == "all" else counts.parts[p.part]
        counted = total if p.kind == "total" else active
        checks.append(CountCheck(p, counted - (counts.embeddings if p.without_embeddings else 0)))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |"
                    for row in rows]


def render_card(name: str) -> str:
    """The Markdown card of catalogue entry `name` (a ``-tiny`` twin renders its real-size entry's card, headed by
    the twin's own architecture and counts)."""
    from zoo.catalogue import get_config, list_models
    from zoo.params import cached_param_counts

    config, card = get_config(name), read_card(name)
    source = card_name(name)
    out = [f"# {card.title}: `{name}`", ""]
    if source != name:
        out += [f"Tiny twin of [`{source}`]({source}.md) for tests: the same layout at test size, random weights. "
                "The recipe and scores below are the real-size model's.", ""]
    out += [card.summary.strip(), ""]
    out += [f"- Paper: {card.paper}" if card.paper else "", f"- Code: {card.code}" if card.code else "",
            f"- Catalogue entry: `configs/models/{name}.yaml` (`zoo.build({name!r})`)", ""]
    out = [line for i, line in enumerate(out) if line or (i and out[i - 1])]

    parts = part_summary(config)
    if config.transformers is not None:  # a transformers-native model: its class, processor and chat template
        extra = [["transformers", f"`{config.transformers.config['model_type']}`, its own forward, processor and "
                  "chat template; sparse blocks swapped for zoo MoE layers"]]
    else:
        extra = [["fusion", f"`{config.fusion.mode}`" if len(config.vision_experts) > 1 else "one expert"],
                 ["prompt", f"`{config.prompt!r}`"]]
    out += ["## Architecture", ""] + _table(["part", "zoo entry"], [[k, f"`{v}`"] for k, v in parts.items()] + extra)
    out += [""]

    counts = cached_param_counts(name)
    rows = [[part, billions(t), billions(a)] for part, (t, a) in counts.parts.items()]
    out += ["## Parameters", "", "Counted by `zoo.param_counts` on the meta device (active: what one token runs "
            "through).", ""] + _table(["part", "total", "active"], rows + [
                ["**all**", f"**{billions(counts.total)}**", f"**{billions(counts.active)}**"]]) + [""]
    if source == name:
        checks = published_checks(name)
        if checks:
            out += ["Published counts:", ""] + [f"- {c} (source: {c.published.source})" for c in checks] + [""]
        twins = [n for n in list_models(tiny=True) if card_name(n) == name]
        for twin in twins:
            tc = cached_param_counts(twin)
            out += [f"Tiny twin `{twin}`: {billions(tc.total)} total, {billions(tc.active)} active.", ""]

    if card.stages:
        out += ["## Training recipe (as published)", ""] + _table(
            ["stage", "trained", "frozen", "data", "LR", "batch", "epochs"],
            [[s.name, s.trained, s.frozen, s.data, s.lr, s.batch, s.epochs] for s in card.stages]) + [""]
    for label, text in (("Shared settings", card.training), ("Hardware and time", card.hardware)):
        if text:
            out += [f"{label}: {text.strip()}", ""]
    if card.scores:
        out += ["## Reference scores", ""] + _table(list(card.scores), [[str(v) for v in card.scores.values()]])
        out += ["", f"Source: {card.scores_source}", ""]
    if card.differences:
        out += ["## What the zoo builds differently", ""] + [f"- {d.strip()}" for d in card.differences] + [""]
    if card.reproduce:
        out += ["## Run it here", "", "```bash"] + card.reproduce + ["```", ""]
    return "\n".join(out).rstrip() + "\n"


def card_entries() -> list[str]:
    """Catalogue entries whose own card source exists (the real-size entries and the demo models)."""
    from zoo.catalogue import list_models

    return [n for n in list_models() if (cards_dir() / f"{n}.yaml").is_file()]


def write_cards(directory: str | Path) -> list[Path]:
    """Write ``<name>.md`` for every entry with a card source, and ``README.md`` (the catalogue table) into
    `directory`; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in card_entries():
        path = directory / f"{name}.md"
        path.write_text(render_card(name))
        written.append(path)
    index = directory / "README.md"
    index.write_text(render_index())
    return written + [index]


def render_index() -> str:
    """The cards' index page: the whole catalogue as a table, each entry linked to its card."""
    from zoo.catalogue import list_models

    return ("# Recipe cards\n\nGenerated by `zoo card --all --out docs/cards` from `configs/models/*.yaml` and the "
            "hand-written `docs/cards/*.yaml`; do not edit the `.md` files by hand.\n\n"
            + catalogue_markdown(list_models(), link=True))


def catalogue_rows(names: list[str], progress: bool = False) -> list[dict[str, str]]:
    """One row per entry: name, family, vision experts, connector, LM, sparsity, total and active parameters
    (counted on the meta device the first time, then read from the cache; `progress` shows a bar on stderr)."""
    from tqdm.auto import tqdm

    from zoo.catalogue import get_config
    from zoo.params import cached_param_counts

    rows = []
    for name in tqdm(names, desc="counting parameters", unit="model", disable=not progress, leave=False):
        config = get_config(name)
        counts = cached_param_counts(name)
        rows.append({"name": name, "family": config.family, **part_summary(config),
                     "total": billions(counts.total), "active": billions(counts.active)})
    return rows


def catalogue_markdown(names: list[str], link: bool = False) -> str:
    """The catalogue table in Markdown (cards linked when `link`)."""
    rows = catalogue_rows(names)
    header = list(rows[0]) if rows else ["name"]

    def cell(row: dict[str, str], key: str) -> str:
        if key == "name" and link:
            return f"[`{row['name']}`]({card_name(row['name'])}.md)"
        return f"`{row[key]}`" if key in ("name", "vision", "connector", "lm") else row[key]

    return "\n".join(_table(header, [[cell(r, k) for k in header] for r in rows])) + "\n"


def catalogue_text(rows: list[dict[str, str]]) -> str:
    """Rows of `catalogue_rows` as an aligned plain-text table (counts right-aligned)."""
    if not rows:
        return "(no entries)\n"
    header = list(rows[0])
    cells = [header] + [[row[k] for k in header] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = {header.index("total"), header.index("active")}
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in cells) + "\n"
