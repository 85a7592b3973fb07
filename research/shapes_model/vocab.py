"""Offline tokenizer and processor for the shapes model (word level: the benchmark's words are the vocabulary)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from research.data.shapes import IMAGE_SIZE, PATCH_SIZE, WORDS

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# EOS is not id 2: CLIP's text tower treats eos_token_id == 2 as "the highest id ends the text" (legacy).
SPECIAL = [PAD, BOS, UNK, EOS, IMAGE]
ROLES = ["USER:", "ASSISTANT:"]
# LLaVA-1.5's format, "USER: <image>\n{question} ASSISTANT: {answer}</s>", one turn after another.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the benchmark's words; ids are stable (special tokens, roles, sorted words)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + ROLES + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE], padding_side="left",
    )


def build_processor() -> LlavaProcessor:
    """``LlavaProcessor``: the word tokenizer and a 48x48 CLIP image processor (no resize or crop needed)."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE, chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped by "default": (48/4)^2 = 144 image tokens
    )
