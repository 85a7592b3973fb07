"""The scorer contract and registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from research.pruning.signals import Signals
from research.registry import Registry


class Scorer:
    """Ranks the remaining vision tokens: ``score(signals) -> [B, V]``, higher = keep.

    Subclasses are dataclasses whose fields are their parameters, registered with
    ``@SCORERS.register("name")``. ``pre_llm`` scorers act at the vision-language interface
    (location -1) and may only read ``signals.interface``; the others act after a decoder layer
    and may read its attention (``signals.t2t``, ``t2v``, ``last_t2v``, ``all_t2v``), or the attention
    the next layer would compute before the cut (``signals.next_layer``); those that read no attention
    (``needs_llm_attention = False``) may also be scheduled at location -1.
    """

    registry_name: ClassVar[str]
    pre_llm: ClassVar[bool] = False
    needs_llm_attention: ClassVar[bool] = True  # False: can also score at location -1, before the LLM
    needs_cls_saliency: ClassVar[bool] = False  # reads the vision tower's CLS attention (``signals.cls_attention``)
    # reads the vision tower's patch states as the image tokens one to one (``signals.patch_states``)
    needs_clip_patches: ClassVar[bool] = False
    # merges inside the vision tower: the engine runs ``merge_options(...)`` there (``research.pruning.vision_merge``)
    needs_vision_merging: ClassVar[bool] = False

    def score(self, signals: Signals) -> Tensor:
        raise NotImplementedError


SOFTMAX_DTYPES = ("model", "float32")


def softmax_dtype(name: str, signals: Signals | None) -> torch.dtype | None:
    """The dtype a scorer's ``dtype`` option asks softmax weights to be averaged in: ``"model"`` = the
    layer's compute dtype (eager attention weights, as the baselines' code reads them); ``"float32"``
    = None (float32 throughout). ``signals=None`` only validates ``name``."""
    if name not in SOFTMAX_DTYPES:
        raise ValueError(f"dtype {name!r} unknown; choose one of {list(SOFTMAX_DTYPES)}")
    if signals is None or name == "float32" or signals.dtype == torch.float32:
        return None  # one float32 computation, shared through the memo
    return signals.dtype


@dataclass
class SoftmaxDtypeOption:
    """A scorer parameter: ``dtype``, what the softmax weights are averaged over heads in (see
    :func:`softmax_dtype`); checked when the scorer is made."""

    dtype: str = "model"  # model | float32: dtype of the softmax weights before the head mean

    def __post_init__(self) -> None:
        softmax_dtype(self.dtype, None)  # validates the name

    def head_mean_dtype(self, signals: Signals) -> torch.dtype | None:
        return softmax_dtype(self.dtype, signals)


SCORERS: Registry[type[Scorer]] = Registry("scorer")
