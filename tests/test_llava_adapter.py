"""LlavaAdapter.from_pretrained / build_inputs on a tiny checkpoint saved to disk (offline, CPU)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH_SIZE
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from research.models.llava import LlavaAdapter

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = ["USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "describe", "this", "picture", "color"]
# LLaVA-1.5's prompt format: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def tiny_processor() -> LlavaProcessor:
    """A word-level tokenizer and a 32x32 CLIP image processor wrapped in a ``LlavaProcessor``."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped by "default": (32/4)^2 = 64 image tokens
    )


def tiny_llava_for(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A tiny LLaVA-1.5 (as ``tiny.tiny_llava``) whose vocabulary and image token match ``tokenizer``."""
    torch.manual_seed(seed)
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = AutoConfig.for_model(
        "llava", vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    return AutoModelForImageTextToText.from_config(config).eval()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny model and its processor saved (safetensors) to ``tmp_path``."""
    processor = tiny_processor()
    model = tiny_llava_for(processor.tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    return tmp_path, model


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), "RGB")
        for _ in range(n)
    ]


def test_from_pretrained_loads_saved_weights(offline: None, checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, saved = checkpoint
    adapter, processor = LlavaAdapter.from_pretrained(path)
    assert isinstance(adapter, LlavaAdapter)
    assert not adapter.model.training
    assert processor.tokenizer.padding_side == "left"
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    loaded = adapter.model.state_dict()
    expected = saved.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_build_inputs_left_pads_and_runs(offline: None, checkpoint: tuple[Path, torch.nn.Module]) -> None:
    adapter, processor = LlavaAdapter.from_pretrained(checkpoint[0])
    questions = ["what is in the image", "describe this picture", "color"]
    inputs = adapter.build_inputs(processor, random_images(3), questions)

    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert inputs["pixel_values"].dtype == adapter.model.dtype
    assert (mask[:, -1] == 1).all()
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) == 3  # different question lengths -> different padding
    for i in range(3):
        pad = input_ids.shape[1] - int(lengths[i])
        assert (mask[i, :pad] == 0).all() and (mask[i, pad:] == 1).all()
        assert (input_ids[i, :pad] == processor.tokenizer.pad_token_id).all()
    assert ((input_ids == adapter.image_token_id).sum(dim=1) == NUM_IMAGE_TOKENS).all()
    unk = processor.tokenizer.unk_token_id
    assert not (input_ids == unk).any()  # the chat-format prompt is fully in-vocabulary

    with torch.no_grad():
        logits = adapter.model(**inputs).logits
    assert logits.shape == (3, input_ids.shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_build_inputs_without_chat_template_uses_llava15_format(
    offline: None, checkpoint: tuple[Path, torch.nn.Module]
) -> None:
    adapter, processor = LlavaAdapter.from_pretrained(checkpoint[0])
    with_template = adapter.build_inputs(processor, random_images(2), ["color", "describe this picture"])
    processor.chat_template = None
    fallback = adapter.build_inputs(processor, random_images(2), ["color", "describe this picture"])
    torch.testing.assert_close(fallback["input_ids"], with_template["input_ids"], rtol=0, atol=0)


def test_from_pretrained_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint.*config.json"):
        LlavaAdapter.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        LlavaAdapter.from_pretrained(empty)
