"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres with a SigLIP tower
(no CLS token: no CLS saliency) and a Qwen2 LLM. Image tokens, including the ``image_newline`` ones,
are set by the image size and are all prunable (see ``llava_next``)."""

from __future__ import annotations

from research.models.base import register
from research.models.llava_next import LlavaNextAdapter


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    lmms_eval_model = "llava_onevision"  # (``llava_hf`` for the -hf checkpoints: the same, no cut)
    cuts_at_until = False  # generate_until pops ``until``
