"""FastV baseline (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Reference followed: the authors' code, ``src/FastV/llava-hf/transformers/src/transformers/models/llama/
modeling_llama.py`` (``fastv_forward`` of its patched LLaMA model) and the lmms-eval path
``src/FastV/lmms-eval-with-kvcache/fastv_kvcache.py``. Before layer K it takes the attention weights layer K-1 returned
(``output_attentions`` at ``layer_idx == K-1``), averages them over heads, keeps the LAST token's row
and the top ``round(V * (1 - R))`` image columns:

    s_v = mean_h softmax(q_last^h K^h^T / sqrt(d))[v]        (layer K-1; K=2, R=50% in the paper)

In this framework "before layer K" is the location ``K-1`` (prune after layer K-1, 0-indexed): K=2 is
``{name: single, layer: 1}``, one stage; FastV never prunes more than once.

Known differences from the authors' code:

* the paper's text ranks by the attention a token receives from all other tokens; its code ranks
  by the last token's attention only. ``query="last"`` (default) is the code; ``query="all"`` is the wording: the mean
  over all other non-padding queries, each token's attention to itself left out (``Signals.all_t2v``);
* their code is batch-1 with a fixed image span (``image_token_start_index``, ``image_token_length``);
  here image positions are read from ``input_ids`` per row and left-padded batches work (the last
  token is the last slot of every row);
* they keep the kept tokens' original position ids (``position_ids = keep_indexs``), as this engine
  does with ``positions=original``; the ``R`` of a run here comes from the experiment's budget;
* ``dtype="model"`` (default) averages the softmax weights over heads in the model's dtype, as the
  eager attention weights they read are (fp32 softmax cast to fp16 in their runs); ``"float32"`` keeps
  fp32. The two differ only on half-precision models, at near-ties of the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer, SoftmaxDtypeOption

QUERIES = ("last", "all")


@SCORERS.register("fastv")
@dataclass
class FastV(Scorer, SoftmaxDtypeOption):
    """Score = head-mean attention to each vision token from the last token (``query="last"``) or,
    averaged, from all other non-padding tokens (``query="all"``), at the layer the engine prunes after."""

    query: str = "last"

    def __post_init__(self) -> None:
        if self.query not in QUERIES:
            raise ValueError(f"fastv query {self.query!r} unknown; choose one of {list(QUERIES)}")
        super().__post_init__()

    def score(self, signals: Signals) -> Tensor:
        dtype = self.head_mean_dtype(signals)
        if self.query == "last":
            return signals.last_to_vision(dtype).float()  # [B, V]
        return signals.all_to_vision(dtype)  # [B, V]
