"""Random-weight models of every family and their inputs, for tests and benchmarks (``research.bench``).

Built from transformers' config classes (nothing is downloaded), in three sizes: ``tiny`` (tests), ``mid``
(benchmarks: text hidden 1024, 16 layers) and, for ``llava15`` and ``qwen2_vl``, ``7b``: the released 7B models'
shapes (``research.gpu_check``; build those on a GPU, ``random_model(..., device="cuda", dtype=torch.bfloat16)``).
One config function and one inputs function per family, registered under its name; a family's adapter module
carries none of this.

>>> model = random_model("llava15", num_layers=2)
>>> batch = random_inputs(model, [5, 9])  # left-padded [BOS, prefix, <image tokens>, question] rows
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from research.models.base import FAMILIES, family_of_class
from research.registry import Registry

# named configurations of a family beyond its default one, built and tested like the families: name -> family
VARIANTS: dict[str, str] = {"internvl3_5": "internvl"}
# (size, num_layers, num_kv_heads) -> the family's (or variant's) transformers config
RANDOM_CONFIGS: Registry[Callable[[str, int | None, int | None], Any]] = Registry("random-model config")
# (model, question_lengths, generator, image_sizes) -> the model's inputs
RANDOM_INPUTS: Registry[Callable[..., dict[str, torch.Tensor]]] = Registry("random-model inputs")


def configurations() -> list[str]:
    """Every family and named variant a random model can be built for (what the family tests run over)."""
    return [*FAMILIES.names(), *VARIANTS]


def family_of_configuration(name: str) -> str:
    """The family of a configuration name (a family's own name, or a variant's family)."""
    return VARIANTS.get(name, name)


def random_config(family: str, size: str = "tiny", num_layers: int | None = None,
                  num_kv_heads: int | None = None) -> Any:
    """The config of a random-weight model of ``family`` (``size``: tiny | mid | 7b; see :func:`random_text_sizes`
    and :data:`SEVEN_B_CONFIGS`)."""
    if size not in ("tiny", "mid", "7b"):
        raise ValueError(f"random model size {size!r} unknown; choose one of ['7b', 'mid', 'tiny']")
    if size == "7b":
        if family not in SEVEN_B_CONFIGS:
            raise ValueError(f"random model size '7b' is given for {sorted(SEVEN_B_CONFIGS)} only, not {family!r}")
        return SEVEN_B_CONFIGS[family](num_layers, num_kv_heads)
    return RANDOM_CONFIGS.get(family)(size, num_layers, num_kv_heads)


def random_model(family: str, size: str = "tiny", num_layers: int | None = None, num_kv_heads: int | None = None,
                 attn_implementation: str = "sdpa", seed: int = 0, vision_layers: int | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A random-weight model of ``family`` ready for tests: eval mode, the attention backend set, greedy
    decoding that never stops early. ``vision_layers``: a vision tower of that depth (merging inside it).
    ``device`` / ``dtype``: built there directly, its weights initialised in that dtype (a 7B model on a GPU in
    seconds, never in float32 on the CPU first)."""
    torch.manual_seed(seed)
    config = random_config(family, size, num_layers, num_kv_heads)
    if vision_layers is not None:
        config.vision_config.num_hidden_layers = vision_layers
    model_class = FAMILIES.get(family_of_configuration(family)).model_type()
    if device is None and dtype is None:
        model = model_class(config)
    else:
        with torch.device(device or "cpu"):
            model = model_class._from_config(config, dtype=dtype or torch.float32)
    model.config._attn_implementation = attn_implementation
    model.set_attn_implementation(attn_implementation)
    model.eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = None  # generated lengths stay comparable
    return model


def random_inputs(model: nn.Module, question_lengths: Sequence[int], seed: int = 0,
                  image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded inputs ``[BOS, prefix, <image tokens>, question]`` per row for a random model of any family;
    ``image_sizes`` (families whose images set their token count) gives each row's image size in pixels."""
    family = family_of_class(type(model).__name__).family
    generator = torch.Generator().manual_seed(seed)
    return RANDOM_INPUTS.get(family)(model, question_lengths, generator, image_sizes)


def random_text_sizes(size: str, num_layers: int | None = None, num_kv_heads: int | None = None) -> dict[str, Any]:
    """Keyword arguments of a random-weight LLM config: ``tiny`` (tests) or ``mid`` (benchmarks: hidden 1024,
    16 layers, LLaMA-7B's MLP ratio); special ids pad 0, BOS 1, EOS 2."""
    tiny = size == "tiny"
    hidden = 64 if tiny else 1024
    heads = 4 if tiny else 16
    return dict(
        vocab_size=64 if tiny else 1000, hidden_size=hidden, intermediate_size=2 * hidden if tiny else 2816,
        num_hidden_layers=num_layers or (6 if tiny else 16), num_attention_heads=heads,
        num_key_value_heads=num_kv_heads or heads, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def left_padded(model: nn.Module, image_counts: Sequence[int], question_lengths: Sequence[int],
                generator: torch.Generator, prefix_length: int = 3, before: Sequence[int] = (),
                after: Sequence[int] = (), spans: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of rows ``[BOS, prefix, before, image*n, after, question]``,
    left-padded; random text ids avoid every special id of the model's config. ``spans``: each row's image span
    as the processor lays it out, instead of ``image*n`` (its ids are avoided too)."""
    config = model.config
    pad, bos = config.text_config.pad_token_id, config.text_config.bos_token_id
    special = {getattr(config, key, None) for key in dir(config) if key.endswith(("token_id", "token_index"))}
    special |= {int(i) for span in spans or () for i in span}
    vocab = config.text_config.vocab_size
    allowed = torch.tensor([i for i in range(4, min(vocab, 64)) if i not in special])
    rows = []
    for r, (count, n) in enumerate(zip(image_counts, question_lengths)):
        prefix = allowed[torch.randint(len(allowed), (prefix_length,), generator=generator)]
        question = allowed[torch.randint(len(allowed), (n,), generator=generator)]
        image = spans[r] if spans is not None else torch.full((count,), config.image_token_id)
        rows.append(torch.cat([torch.tensor([bos]), prefix, torch.tensor(list(before), dtype=torch.long), image,
                               torch.tensor(list(after), dtype=torch.long), question]))
    return left_pad(rows, pad)


def left_pad(rows: Sequence[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` [B, S] of token rows of different lengths, padded on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _side(size: int | Sequence[int]) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


# ---- the released 7B models' shapes (random weights) ------------------------------------------------------------
def llava15_7b_config(num_layers: int | None, num_kv_heads: int | None) -> Any:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, width 1024; features of the 23rd: 576 image tokens), a
    2-layer GELU MLP projector and Vicuna-7B (LLaMA-7B: 32 layers, hidden 4096, MLP 11008, 32 heads)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=num_layers or 32, num_attention_heads=32,
                       num_key_value_heads=num_kv_heads or 32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def qwen2_vl_7b_config(num_layers: int | None, num_kv_heads: int | None) -> Any:
    """Qwen2-VL-7B: a 32-layer ViT (width 1280, patch 14, 2x2 merge: a 672-px image gives 576 tokens) and a Qwen2
    LLM (28 layers, hidden 3584, MLP 18944, 28 query / 4 key-value heads, 3-D rotary sections 16 / 24 / 24)."""
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=num_layers or 28,
                num_attention_heads=28, num_key_value_heads=num_kv_heads or 4, max_position_embeddings=32768,
                rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                         vision_start_token_id=5, vision_end_token_id=6)


SEVEN_B_CONFIGS: dict[str, Callable[[int | None, int | None], Any]] = {
    "llava15": llava15_7b_config, "qwen2_vl": qwen2_vl_7b_config}


# ---- per family ---------------------------------------------------------------------------------------------
@RANDOM_CONFIGS.register("llava15")
def llava_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tiny = size == "tiny"
    vision = CLIPVisionConfig(
        hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512, num_hidden_layers=2,
        num_attention_heads=4, image_size=32 if tiny else 336, patch_size=4 if tiny else 14, projection_dim=32,
    )
    text = LlamaConfig(**random_text_sizes(size, num_layers, num_kv_heads))
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


@RANDOM_CONFIGS.register("internvl")
def internvl_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    tiny = size == "tiny"
    side = 16 if tiny else 224
    vision = InternVLVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                                  num_hidden_layers=2, num_attention_heads=4, image_size=[side, side],
                                  patch_size=[2, 2] if tiny else [14, 14])
    text = Qwen2Config(**random_text_sizes(size, num_layers, num_kv_heads))
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=3, downsample_ratio=0.5)


@RANDOM_CONFIGS.register("internvl3_5")
def internvl3_5_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    """InternVL3.5 in transformers' format: InternVL's tower and pixel shuffle with a Qwen3 LLM, whose attention
    normalises each head's queries and keys (``q_norm`` / ``k_norm``) before the rotary embedding."""
    from transformers import Qwen3Config

    config = internvl_config(size, num_layers, num_kv_heads)
    sizes = random_text_sizes(size, num_layers, num_kv_heads)
    config.text_config = Qwen3Config(**sizes, head_dim=sizes["hidden_size"] // sizes["num_attention_heads"])
    return config


@RANDOM_INPUTS.register("llava15")
@RANDOM_INPUTS.register("internvl")
def one_tile_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                    image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows of one square image each, as many image tokens as the config fixes."""
    side = _side(model.config.vision_config.image_size)
    count = family_of_class(type(model).__name__).vision_layout(model.config).image_tokens
    pixels = torch.randn((len(question_lengths), 3, side, side), generator=generator)
    return left_padded(model, [count] * len(question_lengths), question_lengths, generator) | {"pixel_values": pixels}


@RANDOM_CONFIGS.register("llava_next")
def llava_next_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    tiny = size == "tiny"
    view = 16 if tiny else 112
    vision = CLIPVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                              num_hidden_layers=2, num_attention_heads=4, image_size=view,
                              patch_size=4 if tiny else 7, projection_dim=32)
    text = LlamaConfig(**random_text_sizes(size, num_layers, num_kv_heads))
    pinpoints = [[view, 2 * view], [2 * view, view], [2 * view, 2 * view]]
    return LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                           image_token_id=3, vision_feature_layer=-2)


@RANDOM_CONFIGS.register("llava_onevision")
def llava_onevision_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    next_config = llava_next_config(size, num_layers, num_kv_heads)
    v = next_config.vision_config
    vision = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                num_hidden_layers=2, num_attention_heads=4, image_size=v.image_size,
                                patch_size=v.patch_size)
    text = Qwen2Config(**random_text_sizes(size, num_layers, num_kv_heads))
    return LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                image_grid_pinpoints=next_config.image_grid_pinpoints, image_token_id=3,
                                video_token_id=5, vision_feature_layer=-1)


@RANDOM_INPUTS.register("llava_next")
@RANDOM_INPUTS.register("llava_onevision")
def anyres_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                  image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows whose images have ``image_sizes`` (default: all the base view's size); their token counts
    are the model's own (``get_image_features``), so rows of different sizes differ."""
    view = model.config.vision_config.image_size
    sizes = torch.tensor(list(image_sizes) if image_sizes else [(view, view)] * len(question_lengths))
    most_crops = max((h // view) * (w // view) for h, w in model.config.image_grid_pinpoints)
    pixels = torch.randn((len(question_lengths), 1 + most_crops, 3, view, view), generator=generator)
    with torch.no_grad():
        features = model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output
    counts = [len(f) for f in features]
    return left_padded(model, counts, question_lengths, generator) | {"pixel_values": pixels, "image_sizes": sizes}


@RANDOM_CONFIGS.register("qwen2_vl")
def qwen2_vl_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import Qwen2VLConfig

    tiny = size == "tiny"
    text = random_text_sizes(size, num_layers, num_kv_heads)
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary frequencies, split over t / h / w
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    vision = dict(depth=2, embed_dim=32 if tiny else 256, hidden_size=text["hidden_size"], num_heads=4,
                  patch_size=2 if tiny else 14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                         vision_start_token_id=5, vision_end_token_id=6)


@RANDOM_CONFIGS.register("qwen2_5_vl")
def qwen2_5_vl_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import Qwen2_5_VLConfig

    base = qwen2_vl_config(size, num_layers, num_kv_heads)
    tiny = size == "tiny"
    vision = dict(depth=2, hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                  out_hidden_size=base.text_config.hidden_size, num_heads=4, patch_size=2 if tiny else 14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=8 if tiny else 112,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=base.text_config.to_dict(), vision_config=vision, image_token_id=3,
                            video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)


@RANDOM_CONFIGS.register("qwen3_vl")
def qwen3_vl_config(size: str, num_layers: int | None, num_kv_heads: int | None, moe: bool = False) -> Any:
    """Qwen3-VL: per-head query / key norms, interleaved 3-D rotary sections and DeepStack features from vision
    layers 0, 1, 2 (tiny; 3 of the mid tower's 4) added to the outputs of language layers 0, 1, 2."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    tiny = size == "tiny"
    text = random_text_sizes(size, num_layers, num_kv_heads)
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    half = text["head_dim"] // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                               "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    if moe:  # a few small experts, two per token
        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": text["intermediate_size"] // 2,
                 "decoder_sparse_step": 1}
    vision = dict(depth=3 if tiny else 4, hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                  num_heads=4, out_hidden_size=text["hidden_size"], patch_size=2 if tiny else 14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64 if tiny else 2304,
                  deepstack_visual_indexes=[0, 1, 2] if tiny else [1, 2, 3])
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                        vision_start_token_id=5, vision_end_token_id=6)


@RANDOM_CONFIGS.register("qwen3_vl_moe")
def qwen3_vl_moe_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    return qwen3_vl_config(size, num_layers, num_kv_heads, moe=True)


@RANDOM_INPUTS.register("qwen2_vl")
@RANDOM_INPUTS.register("qwen2_5_vl")
@RANDOM_INPUTS.register("qwen3_vl")
@RANDOM_INPUTS.register("qwen3_vl_moe")
def merged_patch_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                        image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows whose images are ``image_sizes`` pixels (default 16x16 tiny / 224x224 mid): each one's
    patch grid ``(1, h / patch, w / patch)`` and ``h * w / (patch * merge)^2`` image tokens."""
    vision = model.config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    default = 8 * patch * merge // 2 if patch == 2 else 16 * patch
    sizes = list(image_sizes) if image_sizes else [(default, default)] * len(question_lengths)
    grids = torch.tensor([(1, h // patch, w // patch) for h, w in sizes])
    counts = [int(t * h * w) // merge**2 for t, h, w in grids.tolist()]
    pixels = torch.randn((int(grids.prod(1).sum()), 3 * temporal * patch * patch), generator=generator)
    config = model.config
    inputs = left_padded(model, counts, question_lengths, generator, before=[config.vision_start_token_id],
                         after=[config.vision_end_token_id])
    types = (inputs["input_ids"] == config.image_token_id).long()  # 1 = image token
    return inputs | {"pixel_values": pixels, "image_grid_thw": grids, "mm_token_type_ids": types}


# Idefics3 / SmolVLM: the ids their processor's image-span markers get in the random models (not in the config)
FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, NEWLINE_TOKEN, FIRST_ROW_COL_TOKEN = 4, 5, 6, 7  # <row_1_col_1> = 7
FIRST_CROP_TEXT_ID = FIRST_ROW_COL_TOKEN + 36  # the processor names up to 6 x 6 crops; text ids come after


def row_col_token(row: int, col: int) -> int:
    """The id of ``<row_{row + 1}_col_{col + 1}>`` in the random Idefics3 / SmolVLM models."""
    return FIRST_ROW_COL_TOKEN + 6 * row + col


def crop_marker_ids() -> list[int]:
    """Every image-span marker id of the random Idefics3 / SmolVLM models: fake tokens, global tag, newline,
    row / column tags."""
    return [FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, NEWLINE_TOKEN, *range(FIRST_ROW_COL_TOKEN, FIRST_CROP_TEXT_ID)]


def crop_split_span(rows: int, cols: int, crop_tokens: int, image_token_id: int) -> list[int]:
    """The image span Idefics3's processor writes (``Idefics3Processor.replace_image_token``): per crop
    ``<fake><row_i_col_j><image>*n``, a newline after each crop row, then a newline and the global view
    ``<fake><global-img><image>*n<fake>``; an image small enough for one crop (rows = cols = 0) is the global view
    alone."""
    span: list[int] = []
    for row in range(rows):
        for col in range(cols):
            span += [FAKE_TOKEN_AROUND_IMAGE, row_col_token(row, col), *[image_token_id] * crop_tokens]
        span.append(NEWLINE_TOKEN)
    if rows:
        span.append(NEWLINE_TOKEN)
    return span + [FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, *[image_token_id] * crop_tokens,
                   FAKE_TOKEN_AROUND_IMAGE]


def crop_grid(height: int, width: int, side: int) -> tuple[int, int]:
    """Rows and columns of ``side``-pixel crops the processor cuts an image of that size into (0, 0: no split)."""
    if height <= side and width <= side:
        return 0, 0
    return -(-height // side), -(-width // side)


def _idefics3_vision(size: str, scale: int) -> dict[str, Any]:
    """A SigLIP-like tower whose crop gives 16 (tiny) or 64 (mid) image tokens after the ``scale`` pixel shuffle."""
    tiny = size == "tiny"
    patch = 2 if tiny else 14
    side = patch * scale * (2 if tiny else 8)  # crop side: (side / patch / scale)^2 tokens
    return dict(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512, num_hidden_layers=2,
                num_attention_heads=4, image_size=side, patch_size=patch)


@RANDOM_CONFIGS.register("idefics3")
def idefics3_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import Idefics3Config

    text = dict(model_type="llama", **random_text_sizes(size, num_layers, num_kv_heads))
    return Idefics3Config(vision_config=_idefics3_vision(size, 2), text_config=text, image_token_id=3, scale_factor=2)


@RANDOM_CONFIGS.register("smolvlm")
def smolvlm_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import SmolVLMConfig

    text = dict(model_type="llama", tie_word_embeddings=True, **random_text_sizes(size, num_layers, num_kv_heads))
    return SmolVLMConfig(vision_config=_idefics3_vision(size, 4), text_config=text, image_token_id=3, scale_factor=4)


@RANDOM_INPUTS.register("idefics3")
@RANDOM_INPUTS.register("smolvlm")
def crop_split_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows whose images have ``image_sizes`` pixels (default: 2 x 4 crops and the global view, 9 crops: 144 image
    tokens tiny, 576 mid), laid out as the processor lays them out (:func:`crop_split_span`). ``pixel_values``
    ``[B, most crops, 3, side, side]``: each row's crops then its global view, a row with fewer crops padded with
    all-zero crops (which the model drops) and zeros in ``pixel_attention_mask``."""
    config = model.config
    side = config.vision_config.image_size
    per_crop = family_of_class(type(model).__name__).crop_tokens(config)
    sizes = list(image_sizes) if image_sizes else [(2 * side, 4 * side)] * len(question_lengths)
    grids = [crop_grid(h, w, side) for h, w in sizes]
    crops = [rows * cols + 1 for rows, cols in grids]
    pixels = torch.zeros((len(sizes), max(crops), 3, side, side))
    mask = torch.zeros((len(sizes), max(crops), side, side), dtype=torch.long)
    special = {config.text_config.pad_token_id, config.text_config.bos_token_id, config.text_config.eos_token_id,
               config.image_token_id}
    text_ids = torch.tensor([i for i in range(FIRST_CROP_TEXT_ID, min(config.text_config.vocab_size, 64))
                             if i not in special])
    rows = []
    for r, ((grid_rows, grid_cols), count, n) in enumerate(zip(grids, crops, question_lengths)):
        pixels[r, :count] = torch.randn((count, 3, side, side), generator=generator)
        mask[r, :count] = 1
        prefix, question = (text_ids[torch.randint(len(text_ids), (k,), generator=generator)] for k in (3, n))
        span = torch.tensor(crop_split_span(grid_rows, grid_cols, per_crop, config.image_token_id))
        rows.append(torch.cat([torch.tensor([config.text_config.bos_token_id]), prefix, span, question]))
    return left_pad(rows, config.text_config.pad_token_id) | {"pixel_values": pixels, "pixel_attention_mask": mask}


# Mistral 3's processor tokens around its [IMG] tokens (ids of the random models; real ones are the tokenizer's)
IMAGE_BREAK_ID, IMAGE_END_ID = 5, 6


@RANDOM_CONFIGS.register("mistral3")
def mistral3_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    tiny = size == "tiny"
    vision = PixtralVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                                 num_hidden_layers=2, num_attention_heads=4, image_size=32 if tiny else 1540,
                                 patch_size=2 if tiny else 14)
    text = MistralConfig(**random_text_sizes(size, num_layers, num_kv_heads), sliding_window=None)
    return Mistral3Config(vision_config=vision, text_config=text, image_token_id=3, spatial_merge_size=2,
                          vision_feature_layer=-1)


@RANDOM_INPUTS.register("mistral3")
def pixtral_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                   image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows whose images are ``image_sizes`` pixels (multiples of patch * merge; default 16x16 tiny / 672x672 mid:
    576 tokens), laid out as Mistral 3's processor lays them out: per row of merged patches, one ``[IMG]`` each and
    an ``[IMG_BREAK]``, the last ``[IMG_BREAK]`` an ``[IMG_END]``. ``pixel_values`` are padded to the largest image,
    which the tower crops back to ``image_sizes``."""
    config = model.config
    side = family_of_class(type(model).__name__).merged_patch(config)
    default = 16 if config.vision_config.patch_size == 2 else 672
    sizes = list(image_sizes) if image_sizes else [(default, default)] * len(question_lengths)
    spans = [pixtral_image_span(h // side, w // side, config.image_token_id) for h, w in sizes]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.randn((len(sizes), 3, height, width), generator=generator)
    return (left_padded(model, [0] * len(sizes), question_lengths, generator, spans=spans)
            | {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)})


def pixtral_image_span(rows: int, columns: int, image_token_id: int) -> torch.Tensor:
    """A ``rows`` x ``columns`` image's tokens: ``[IMG] * columns + [IMG_BREAK]`` per row, the last break
    ``[IMG_END]`` (transformers' ``PixtralProcessor.replace_image_token``)."""
    row = [image_token_id] * columns + [IMAGE_BREAK_ID]
    span = torch.tensor(row * rows)
    span[-1] = IMAGE_END_ID
    return span


@RANDOM_CONFIGS.register("gemma3")
def gemma3_config(size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
    """Gemma 3: sliding-window and global layers alternating (tiny: S, F, S, F; mid: 5 sliding per global, as the
    released models), their own rotary bases (10k / 1M), per-head query / key norms, and a SigLIP tower whose
    patches the projector pools to ``mm_tokens_per_image`` image tokens (tiny 16, mid 256 as released: 32x32
    patches pooled 2x2). The window (tiny 64, mid 1024) is longer than every prompt with its answer here."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    tiny = size == "tiny"
    text = random_text_sizes(size, num_layers, num_kv_heads)
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    period = 2 if tiny else 6  # one global layer every ``period``
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
             for i in range(text["num_hidden_layers"])]
    text_config = Gemma3TextConfig(**text, layer_types=types, sliding_window=64 if tiny else 1024,
                                   query_pre_attn_scalar=text["head_dim"])
    vision = SiglipVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                                num_hidden_layers=2, num_attention_heads=4, image_size=16 if tiny else 448,
                                patch_size=2 if tiny else 14)
    return Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=16 if tiny else 256,
                        image_token_index=3, boi_token_index=4, eoi_token_index=5)


@RANDOM_INPUTS.register("gemma3")
def gemma3_inputs(model: nn.Module, question_lengths: Sequence[int], generator: torch.Generator,
                  image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Rows of one square image each, laid out as Gemma 3's processor lays them out: ``<start_of_image>``, the
    ``mm_tokens_per_image`` image tokens, ``<end_of_image>``; ``token_type_ids`` marks the image tokens (1), which
    attend to each other both ways in the prefill."""
    config = model.config
    side = config.vision_config.image_size
    pixels = torch.randn((len(question_lengths), 3, side, side), generator=generator)
    inputs = left_padded(model, [config.mm_tokens_per_image] * len(question_lengths), question_lengths, generator,
                         before=[config.boi_token_index], after=[config.eoi_token_index])
    types = (inputs["input_ids"] == config.image_token_id).long()
    return inputs | {"pixel_values": pixels, "token_type_ids": types}
