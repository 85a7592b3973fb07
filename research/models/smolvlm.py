"""SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's layout (SigLIP tower without CLS token,
pixel-shuffle connector, crops plus a global view) with a SmolLM2 LLM (LLaMA architecture) and a larger
``scale_factor`` (4 in SmolVLM-256M / 500M: 64 tokens per 512-px crop). Everything the engine needs is as in
``idefics3``.

Prunable image tokens: the ``<image>`` tokens (``config.image_token_id``) of every crop and of the global view.
The markers stay: ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>`` and the newlines between
crop rows are text tokens to the engine, never ranked, pruned or counted (``tests/test_families.py``)."""

from __future__ import annotations

from research.models.base import register
from research.models.idefics3 import Idefics3Adapter


@register
class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_class = "SmolVLMForConditionalGeneration"
    lmms_eval_model = "idefics2"  # no SmolVLM wrapper in lmms-eval 0.7.3 (see ``idefics3``)
    cuts_at_until = False

    def fallback_prompt(self, question: str) -> str:
        return f"<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"
