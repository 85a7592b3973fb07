"""One short label per combination, used everywhere a user meets it: the TensorBoard run (its directory), the
HParams ``combination`` value, the figures' legends and ticks, the progress bar and the summary's text table.

A label is the combination's parts joined by "/": the scorer, the schedule, the budget and (when the scorer entry
chose them) the positions. The parts that tell the sweep's combinations apart come first (the one with the most
distinct values first), the constant ones after, so the run selector shows the difference before it cuts a name
off: ``layers[1-10-20_of32]/text_prior/64``, ``random(seed=0)/text_prior/64``, ``vanilla``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from research.combination import Combination

VANILLA = "vanilla"
UNSAFE = re.compile(r"[^A-Za-z0-9_()=,\[\].@+-]+")  # a part keeps ()=,[]-.@+ besides letters, digits and "_"


def safe_part(text: str) -> str:
    """``text`` as one directory name that reads as written: no quotes or spaces, "/" as ``_of``
    (``layers[1-10-20/32]`` -> ``layers[1-10-20_of32]``, ``fastv(query="all")`` -> ``fastv(query=all)``)."""
    text = text.replace("/", "_of").replace('"', "").replace("'", "")
    return UNSAFE.sub("_", text).strip("_") or "_"


def budget_part(budget: float) -> str:
    """A budget as written: ``64`` (not ``64.0``) for a number of tokens, ``0.3333`` for a fraction."""
    return str(int(budget)) if float(budget).is_integer() else f"{budget:.6g}"


def label_parts(combo: Combination, with_positions: bool) -> dict[str, str]:
    """The parts of a pruned combination's label by kind (``positions`` only ``with_positions``)."""
    parts = {"scorer": safe_part(combo.scorer_label), "schedule": safe_part(combo.schedule),
             "budget": budget_part(combo.budget)}
    if with_positions:
        parts["positions"] = safe_part(combo.positions)
    return parts


def combination_labels(combos: list[Combination]) -> dict[str, str]:
    """Each combination's label by ``combo.name`` (see the module docstring); distinct combinations get
    distinct labels (a clash, e.g. of two parameters that read alike once made safe, gets ``~2``, ``~3``)."""
    pruned = [c for c in combos if not c.is_vanilla]
    with_positions = any(c.own_positions for c in pruned)  # every label then has the part: one depth for all
    parts = {c.name: label_parts(c, with_positions) for c in pruned}
    kinds = list(next(iter(parts.values()), {}))
    distinct = {kind: len({p[kind] for p in parts.values()}) for kind in kinds}
    order = sorted(kinds, key=lambda kind: -distinct[kind] if distinct[kind] > 1 else 0)  # stable: ties keep order
    labels = {c.name: VANILLA for c in combos if c.is_vanilla}
    taken = set(labels.values())
    for name, part in parts.items():
        label = candidate = "/".join(part[kind] for kind in order)
        count = 1
        while candidate in taken:
            count += 1
            candidate = f"{label}~{count}"
        labels[name] = candidate
        taken.add(candidate)
    return labels


def legacy_run_name(combo: Combination) -> str:
    """The run directory a combination was logged under before the labels (``<scorer>/<schedule>/b<budget>``,
    each part a slug): where a result written then finds its run."""
    from research.specs import slug

    if combo.is_vanilla:
        return VANILLA
    budget = f"b{combo.budget:g}{combo.positions_suffix}"
    return "/".join([slug(combo.scorer_label), slug(combo.schedule), slug(budget)])
