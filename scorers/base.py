"""The scorer contract and registry."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from research.pruning.signals import Signals
from research.registry import Registry


class Scorer:
    """Ranks the remaining vision tokens: ``score(signals) -> [B, V]``, higher = keep.

    Subclasses are dataclasses whose fields are their parameters, registered with
    ``@SCORERS.register("name")``. ``pre_llm`` scorers act at the vision-language interface
    (location -1) and may only read ``signals.interface``; the others act after a decoder layer
    and may read its attention (``signals.t2t``, ``t2v``, ``last_t2v``, ``all_t2v``); those that do not
    (``needs_llm_attention = False``) may also be scheduled at location -1.
    """

    registry_name: ClassVar[str]
    pre_llm: ClassVar[bool] = False
    needs_llm_attention: ClassVar[bool] = True  # False: can also score at location -1, before the LLM

    def score(self, signals: Signals) -> Tensor:
        raise NotImplementedError


SCORERS: Registry[type[Scorer]] = Registry("scorer")
