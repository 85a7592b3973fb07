"""PyramidDrop baseline, training-free (Xing et al., "PyramidDrop", CVPR 2025).

Reference followed: the authors' code, ``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward`` and
``pdrop_rank_drop`` of its patched LLaMA). After the layer before each ``rank_layer`` in ``layer_list`` (8, 16, 24 of
LLaVA-1.5-7B's 32), it applies ``layers[rank_layer]``'s own ``input_layernorm``, ``q_proj`` and ``k_proj``
to the output hidden states (the whole, unpruned sequence, current position ids), and ranks the image
tokens by the attention of the LAST instruction token:

    s_v = mean_h softmax(q_last^h K^h^T / sqrt(d) + mask).to(model dtype)[v]     (layer rank_layer)

then keeps the top ``lambda`` share (``image_token_ratio_list``: 1, 0.5, 0.25, 0.125 with lambda = 0.5)
and runs ``rank_layer`` on the kept tokens. Here pruning after layer ``l`` with ``attention="next"``
(default) ranks by what layer ``l + 1`` would compute before the cut (``Signals.next_layer``): its
``layer_list`` [8, 16, 24] is the schedule ``{name: layers, layers: [8, 16, 24], scale_from: 32,
prune_before: true}`` (locations 7, 15, 23; rescaled, four equal stages of any depth), with the
schedule's ``ratio: 0.5`` as lambda.

Options and known differences from the authors' code:

* ``attention="same"`` ranks by the attention of the layer the engine prunes after (``l``) instead
  of the next one (this framework's earlier reading);
* ``dtype="model"`` (default, as their code) casts the float32 softmax to the model's dtype before
  the head mean, so on half-precision models near-equal scores tie at the cut like theirs;
  ``"float32"`` keeps float32 (the two agree on float32 models);
* positions: PyramidDrop renumbers the kept tokens' position ids after every drop (prefill) and
  shifts them in decode; that is the engine's ``positions=compact``, which the paper protocol needs
  (``experiments/paper_baselines.yaml`` sets it for pdrop's entry). With the default
  ``positions=original`` the ranking is the same at the first stage but later stages, and the
  outputs, differ;
* keep counts: theirs are ``int(V * lambda**s)`` for the fixed lambda; here the budget solver picks
  stage 0's count from the experiment's average budget and the schedule's ``ratio`` (lambda) scales
  the later ones;
* their code is right-padding only, per sample in a loop (``prompt_len``, ``image_token_posi``); here
  the last instruction token is the last slot of each left-padded row, image positions come from
  ``input_ids``, and padding is masked out of the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer, SoftmaxDtypeOption

ATTENTION = ("next", "same")


@SCORERS.register("pdrop")
@dataclass
class PDrop(Scorer, SoftmaxDtypeOption):
    """Score = head-mean attention from the last instruction token to each vision token, computed by
    the first layer that runs on the kept tokens (``attention="next"``) or the one pruned after (``"same"``)."""

    attention: str = "next"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"pdrop attention {self.attention!r} unknown; choose one of {list(ATTENTION)}")
        super().__post_init__()

    def score(self, signals: Signals) -> Tensor:
        source = signals.next_layer if self.attention == "next" else signals
        return source.last_to_vision(self.head_mean_dtype(source)).float()  # [B, V]
