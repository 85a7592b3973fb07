"""What the pruning engine asks of a model family, and the registry of families.

A family is one transformers ``*ForConditionalGeneration`` class. Its adapter (one module per
family in ``research/models/``) says where the engine finds:

* the module whose forward receives ``input_ids`` (``multimodal_model``), the decoder stack
  (``language_model``), its ``decoder_layers`` and ``rotary_emb``;
* per decoder layer, the attention projections (``q_proj`` / ``k_proj``) and the per-head query / key norms
  after them if any (``q_norm`` / ``k_norm``: what the attention rotates), the input norm and the
  attention scaling;
* the vision tower and, if the family has one that maps onto its image tokens, the CLS-attention
  source of visual saliency (``vision_attention``; ``None`` otherwise);
* the image token id, and the vision layout read from ``config.json`` alone
  (:meth:`VLMAdapter.vision_layout`: the image-token count, or ``None`` when the image decides it).

What every family shares needs no spec: position ids are ``[..., B, S]`` with the sequence on the
last axis (LLaMA-style ``[B, S]``; Qwen2-VL's multimodal ``[3, B, S]`` or ``[4, B, S]``), and every
decoder layer of one type (``config.text_config.layer_types``; one type where a config names none)
receives the same mask and rotary ``position_embeddings``. A family whose layers are of several types
(Gemma 3: sliding-window layers beside global ones, each type with its own mask and rotary base) says so
(``mixed_layer_types``); any other config that mixes them is refused (:meth:`VLMAdapter.check_config`).

The engine and the rest of the project name no model class: they ask :func:`adapter_for` (a loaded
model) or :func:`family_of_config` (a ``config.json``) which adapter applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from research.registry import Registry

FAMILIES: Registry[type] = Registry("model family")


class UnsupportedModel(ValueError):
    """A model class no adapter covers, or a configuration the engine cannot prune correctly; one line."""


@dataclass(frozen=True)
class VisionLayout:
    """What ``config.json`` alone says about a family's image tokens."""

    num_layers: int  # decoder layers of the LLM
    image_tokens: int | None  # image tokens per image, or None when the image's size sets them
    rule: str  # how the count arises (shown in errors and the README)
    nominal_tokens: int  # the count an absolute budget is planned against (the fixed count, or a typical one)


@dataclass(frozen=True)
class VisionMergeSites:
    """Where a family's vision tower is hooked for merging inside it (``VLMAdapter.vision_merge_sites``; the merge
    itself is ``research.pruning.vision_merge``'s)."""

    tower: nn.Module  # its forward starts a new image batch
    tower_layers: int  # encoder layers in all (an r schedule is given per tower layer)
    layers: Sequence[nn.Module]  # the encoder layers whose output reaches the features, in order
    projector: nn.Module  # maps the selected features [images, k, Dv] to the LLM's [images, k, D]
    num_heads: int
    tower_tokens: int  # tokens entering the first layer (CLS included)
    image_tokens: int  # image tokens per image in the LLM input (n)
    class_token: bool  # slot 0 is a CLS token: never merged


class VLMAdapter:
    """Locates the parts of a VLM the pruning engine hooks into; one subclass per family.

    The defaults fit transformers' common layout (``model.model.language_model.layers[i].self_attn``);
    a family overrides only what differs.
    """

    family: ClassVar[str]  # registry name, e.g. "llava15"
    model_class: ClassVar[str]  # the transformers class it adapts, e.g. "LlavaForConditionalGeneration"
    # vision_attention() gives CLS attention over the image tokens, whose patch states are the image tokens 1:1
    has_cls_saliency: ClassVar[bool] = False
    # Its vision tower's token sequence can be merged (ToMe) and handed to the LLM as a shorter image span
    # (``vision_merge_sites``); otherwise ``no_vision_merging`` says why not, in a few words.
    supports_vision_merging: ClassVar[bool] = False
    no_vision_merging: ClassVar[str] = "its image tokens are not the vision tower's token sequence one to one"
    position_axes: ClassVar[int] = 1  # rows of position_ids ([B, S]: 1; multimodal rotary [3, B, S]: 3)
    # Where an answer is cut, as lmms-eval 0.7.3's model wrapper for the family cuts it (README: "Where an answer
    # is cut"): the wrapper, whether it cuts at the task's stop strings (``until``) at all, those it drops first.
    lmms_eval_model: ClassVar[str]
    cuts_at_until: ClassVar[bool]
    drops_until: ClassVar[tuple[str, ...]] = ()
    # DeepStack (Qwen3-VL): the language model's keywords for the visual positions [B, S] and the list of per-layer
    # visual features it adds to the first ``deepstack_layers`` layers' outputs; None: the family has none
    deepstack_keywords: ClassVar[tuple[str, str] | None] = None
    # Its decoder layers may be of several types (``layer_types``), each type with its own mask and rotary embedding
    mixed_layer_types: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        if type(model).__name__ != self.model_class:
            raise TypeError(f"{type(self).__name__} needs a {self.model_class}, got {type(model).__name__}")
        self.model = model
        self.check_config(model.config)
        text_config = model.config.text_config
        self.num_layers: int = text_config.num_hidden_layers
        self.num_heads: int = text_config.num_attention_heads
        self.num_kv_heads: int = text_config.num_key_value_heads
        self.hidden_size: int = text_config.hidden_size
        self.intermediate_size: int = text_config.intermediate_size
        self.head_dim: int = getattr(text_config, "head_dim", None) or self.hidden_size // self.num_heads
        self.image_token_id: int = model.config.image_token_id

    # ---- what config.json says (no weights) -------------------------------------------------------
    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse, in one line, a configuration the engine cannot prune correctly."""
        kinds = sorted(set(getattr(config.text_config, "layer_types", None) or []))
        if len(kinds) > 1 and not cls.mixed_layer_types:
            raise UnsupportedModel(
                f"{cls.model_class} with mixed decoder layer types {kinds} is not supported: the engine slices each "
                "type's mask and rotary embedding alike, tested on Gemma 3's mix only; supported: one layer type"
            )
        window, image_tokens = cls.sliding_window(config), cls.vision_layout(config).nominal_tokens
        if window is not None and window <= image_tokens:
            raise UnsupportedModel(sliding_window_refusal(cls.model_class, window, f"{image_tokens} image tokens"))

    @classmethod
    def sliding_window(cls, config: Any) -> int | None:
        """The language model's sliding attention window in tokens (Mistral v0.1-style configs), or None when
        its layers attend to the whole sequence (no window, or one its config leaves unused, as Qwen2's)."""
        text = config.text_config
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if window is None:
            return None
        if layer_types:
            return window if "sliding_attention" in layer_types else None
        return window if getattr(text, "use_sliding_window", True) else None

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        raise NotImplementedError

    @classmethod
    def compact_positions_refusal(cls) -> str | None:
        """Why ``positions=compact`` cannot run on this family (one line), or None when it can."""
        if cls.position_axes > 1:
            return (f"positions=compact renumbers 1-D positions; {cls.family}'s multimodal rotary positions have "
                    f"{cls.position_axes} axes: use positions=original")
        return None

    @classmethod
    def deepstack_layers(cls, config: Any) -> int:
        """How many language layers (the first ones) get DeepStack features added to their outputs."""
        return 0

    @classmethod
    def stop_strings(cls, until: Sequence[str]) -> tuple[str, ...]:
        """The task's stop strings (lmms-eval's ``until``) that this family's lmms-eval wrapper cuts answers at."""
        return tuple(stop for stop in until if stop not in cls.drops_until) if cls.cuts_at_until else ()

    # ---- modules the engine hooks ----------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` (image positions are read there)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack; its forward pre-hook is the vision-language interface."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        """The norm the language model applies after its last decoder layer (``norm``)."""
        return self.language_model.norm

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def layer_types(self) -> list[str]:
        """Each decoder layer's type (``config.text_config.layer_types``; all ``full_attention`` where the config
        names none): layers of one type receive the same mask and rotary embedding."""
        types = getattr(self.model.config.text_config, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.num_layers

    def rotary_for(self, layer_idx: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The rotary embedding of decoder layer ``layer_idx``'s type: ``rotary(x, position_ids=) -> (cos, sin)``."""
        return self.rotary_emb

    def flat_projection(self, output: torch.Tensor) -> torch.Tensor:
        """A query / key source's output (``query_key_sources``) as ``[B, S, H*hd]``: projections give it so; a
        per-head norm's ``[B, S, H, hd]`` is flattened."""
        return flat_heads(output)

    def attention_projections(self, layer_idx: int) -> tuple[nn.Module, nn.Module]:
        """(q_proj, k_proj) of decoder layer ``layer_idx``."""
        attn = self.decoder_layers[layer_idx].self_attn
        return attn.q_proj, attn.k_proj

    def query_key_norms(self, layer_idx: int) -> tuple[nn.Module, nn.Module] | None:
        """(q_norm, k_norm) that decoder layer ``layer_idx`` applies to its projections before the rotary
        embedding (Qwen3, as in InternVL3.5; Gemma 3), or None when it applies none."""
        attn = self.decoder_layers[layer_idx].self_attn
        norms = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return None if norms[0] is None and norms[1] is None else norms

    def query_key_sources(self, layer_idx: int) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are decoder layer ``layer_idx``'s queries and keys exactly as its attention
        rotates them: the norms after the projections where the layer has them, else the projections."""
        projections, norms = self.attention_projections(layer_idx), self.query_key_norms(layer_idx)
        return projections if norms is None else (norms[0] or projections[0], norms[1] or projections[1])

    def queries_keys(self, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer ``layer_idx``'s queries [B, S, H*hd] and keys [B, S, Hkv*hd] before the rotary
        embedding, computed from its input ``hidden`` [B, S, D] as the layer computes them: input norm,
        projections, then the per-head query / key norms if it has them."""
        normed = self.input_norm(layer_idx)(hidden)
        q_proj, k_proj = self.attention_projections(layer_idx)
        q, k = q_proj(normed), k_proj(normed)
        norms = self.query_key_norms(layer_idx) or (None, None)
        return tuple(x if norm is None else flat_heads(norm(x.unflatten(-1, (-1, self.head_dim))))
                     for x, norm in zip((q, k), norms))

    def input_norm(self, layer_idx: int) -> nn.Module:
        """The norm decoder layer ``layer_idx`` applies to its input before attention (``input_layernorm``)."""
        return self.decoder_layers[layer_idx].input_layernorm

    def attention_scaling(self, layer_idx: int) -> float:
        return float(self.decoder_layers[layer_idx].self_attn.scaling)

    def vision_attention(self) -> tuple[nn.Module, nn.Module, int, float] | None:
        """(q_proj, k_proj, num_heads, scale) of the vision layer whose CLS attention ranks the image
        tokens one to one; ``None`` for a family without such a source (no CLS, merged or cropped patches)."""
        return None

    def vision_merge_sites(self) -> VisionMergeSites:
        """Where the vision tower is hooked to merge its tokens (:class:`VisionMergeSites`);
        one line saying why not for a family without ``supports_vision_merging``."""
        raise UnsupportedModel(f"{self.family} cannot merge inside its vision tower ({self.no_vision_merging})")

    def token_grid(self, num_tokens: int) -> int | None:
        """Side of the square patch grid the image's ``num_tokens`` tokens form one to one (row-major), for
        drawing which were kept; None if they form none (crops, newline tokens, a non-square image)."""
        side = round(num_tokens**0.5)
        return side if side * side == num_tokens and self.vision_layout(self.model.config).image_tokens else None

    @property
    def path(self) -> Path | None:
        """The local directory the model was loaded from, if any."""
        name = self.model.config.name_or_path
        return Path(name) if name and Path(name).is_dir() else None

    # ---- loading and inputs --------------------------------------------------------------------
    @classmethod
    def model_type(cls) -> type:
        import transformers

        return getattr(transformers, cls.model_class)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
    ) -> tuple[VLMAdapter, Any]:
        """Load a local checkpoint directory (safetensors, never remote code) and its processor.

        Returns ``(adapter, processor)``; the processor's tokenizer pads on the left.
        Raises FileNotFoundError if ``path`` holds no ``config.json``.
        """
        from transformers import AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: expected a local Hugging Face checkpoint directory (config.json + *.safetensors)"
            )
        model = cls.model_type().from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False
        )
        model = model.eval().to(device)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        processor.tokenizer.padding_side = "left"
        return cls(model), processor

    def build_inputs(self, processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict:
        """Batched, left-padded model inputs for (image, question) pairs in the model's chat format.

        Each prompt comes from the processor's chat template when it has one, otherwise from
        :meth:`fallback_prompt`; the processor expands the image placeholder to the image's tokens.
        Returns a ``BatchFeature`` on the model's device, floating tensors in the model's dtype.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        if getattr(processor, "chat_template", None):
            prompts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                    add_generation_prompt=True,
                )
                for q in questions
            ]
        else:
            prompts = [self.fallback_prompt(q) for q in questions]
        inputs = processor(
            images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        inputs = inputs.to(self.model.device)
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(self.model.dtype)
        return inputs

    def fallback_prompt(self, question: str) -> str:
        """The prompt for a processor without a chat template (LLaVA-1.5's format)."""
        return f"USER: <image>\n{question} ASSISTANT:"


def sliding_window_refusal(model_class: str, window: int, prompt: str) -> str:
    """One line: a sliding window the engine cannot prune under (it would count it on the pruned slots)."""
    return (f"{model_class}'s language model attends within a sliding window of {window} tokens, shorter than "
            f"{prompt}: pruning would count the window on the kept slots, not on the original positions as the "
            "unpruned model does; supported: a window longer than every prompt with its answer")


def vision_merging_refusal(adapter: type[VLMAdapter], scorer: str) -> str:
    """One line: scorer ``scorer`` merges inside the vision tower, which family ``adapter`` cannot do."""
    able = [name for name in FAMILIES.names() if FAMILIES.get(name).supports_vision_merging]
    return (f"scorer {scorer!r} merges tokens inside the vision tower, which {adapter.family} ({adapter.model_class}) "
            f"cannot hand to its language model as a shorter image span ({adapter.no_vision_merging}); use a model "
            f"of family {able}")


def flat_heads(x: torch.Tensor) -> torch.Tensor:
    """Queries or keys ``[B, S, H, hd]`` (a per-head norm's output) as ``[B, S, H*hd]``; 3-D ones unchanged."""
    return x.flatten(-2) if x.dim() == 4 else x


def register(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: registers an adapter under its ``family``."""
    return FAMILIES.register(cls.family)(cls)


def supported() -> str:
    return ", ".join(f"{name} ({FAMILIES.get(name).model_class})" for name in FAMILIES.names())


def stop_string_table() -> str:
    """The README's table of where each family's answers are cut (``tests/test_benchmarks.py`` checks it is there)."""
    import json

    def cut(adapter: type[VLMAdapter]) -> str:
        if not adapter.cuts_at_until:
            return "nowhere: the wrapper ignores `until`"
        dropped = ", ".join(f"`{json.dumps(stop)}`" for stop in adapter.drops_until)
        return "the task's `until`" + (f" except {dropped} (the wrapper drops it)" if dropped else "")

    rows = ["| family | lmms-eval 0.7.3 wrapper | answers cut at |", "|---|---|---|"]
    rows += [f"| `{name}` | `{FAMILIES.get(name).lmms_eval_model}` | {cut(FAMILIES.get(name))} |"
             for name in FAMILIES.names()]
    return "\n".join(rows)


_LINEAR_ATTENTION = ("its language model runs linear-attention (Gated DeltaNet) recurrences in three of every "
                     "four layers: a recurrence has no attention mask, so a token dropped before one has no masked "
                     "reference to equal, no attention weights rank it there, and the cache holds a recurrent state "
                     "beside the KV entries; pruning is not defined for it here")
# transformers classes people ask for that the engine refuses, and why (one line each)
REFUSED_CLASSES: dict[str, str] = {
    "Qwen3_5ForConditionalGeneration": _LINEAR_ATTENTION,
    "Qwen3_5MoeForConditionalGeneration": _LINEAR_ATTENTION,
}


def family_of_class(class_name: str) -> type[VLMAdapter]:
    """The adapter registered for transformers class ``class_name``; one line naming the supported ones (and why
    not, for a class the engine refuses on purpose)."""
    for name in FAMILIES.names():
        if FAMILIES.get(name).model_class == class_name:
            return FAMILIES.get(name)
    why = f": {REFUSED_CLASSES[class_name]}" if class_name in REFUSED_CLASSES else ""
    raise UnsupportedModel(f"model class {class_name} cannot be pruned{why}; supported families: {supported()}")


def adapter_for(model: nn.Module) -> VLMAdapter:
    """The adapter of a loaded model's family; one line naming the supported families otherwise."""
    return family_of_class(type(model).__name__)(model)


def family_of_config(raw: dict) -> type[VLMAdapter]:
    """The adapter for a checkpoint's parsed ``config.json`` (its ``architectures``, else ``model_type``)."""
    architectures = raw.get("architectures") or []
    if architectures:
        return family_of_class(architectures[0])
    model_type = raw.get("model_type")
    for name in FAMILIES.names():
        adapter = FAMILIES.get(name)
        if adapter.model_type().config_class.model_type == model_type:
            return adapter
    raise UnsupportedModel(f"config.json of model_type {model_type!r} names no architecture this project can prune; "
                           f"supported families: {supported()}")
