"""The hook engine: applies a scorer and a pruning plan to a Hugging Face VLM through forward hooks.

No transformers code is copied or patched. The hooks, per forward of the multimodal model:

* multimodal model, pre-hook: notices a cached decode step of the last prefill (a non-empty KV
  cache, found by its type, not its keyword) or reads image / question positions from
  ``input_ids`` (prefill);
* language model, pre-hook: the vision-language interface. Keeps a reference to the LLM input
  embeddings; with location -1 it prunes ``inputs_embeds`` and slices mask and positions;
* every decoder layer, pre-hook: the first layer of each layer type (``adapter.layer_types()``: one type
  in most families; Gemma 3's sliding and global layers) keeps the per-call kwargs every layer of that type
  receives (mask, cos/sin, position ids); a layer after a stage gets its type's sliced (below);
* ``q_proj`` / ``k_proj`` of pruning layers (or the per-head ``q_norm`` / ``k_norm`` after them, where a
  layer has them: Qwen3), forward hooks (prefill): keep references to the layer's own queries and keys
  before the rotary embedding, from which attention rows are recomputed only if a scorer asks;
* pruning layer, forward hook (prefill): scores the vision tokens, keeps the top-k and gathers
  the layer output. A scorer that asks for ``signals.next_layer`` gets the attention the next
  layer would compute on the unpruned output: that layer's input norm, ``q_proj`` and ``k_proj`` (and its
  query / key norms) run once more on the output, only then; one that asks for ``signals.normed_hidden``
  gets the output through the language model's final norm (DART), computed then too;
* every layer after a stage: swaps in its type's mask / cos / sin / position ids sliced to the kept
  tokens. In decode the kept set is fixed; mask columns are remapped to ``kept ∪ new tokens``
  for each stage's KV cache (DynamicCache, StaticCache and no cache alike).

A language model that receives one mask per layer type (a dict, Gemma 3's, built by the multimodal model with its
image tokens attending to each other both ways) gets each entry sliced at the interface in the prefill; in a
decode step the types' masks agree (the sequence fits the sliding window, else it is refused, and a new token
attends causally), so the interface hands the language model the remapped 2-D mask to build them from, and
layers after a stage get layer 0's decode mask sliced (a type whose first layer runs after a stage has its mask
sized on that layer's shorter cache).

Merging after a decoder layer (SparseVLM's recycling) or at the vision-language interface (location -1, on the
image embeddings the LLM receives): a scorer may also define ``keep_counts(signals,
planned) -> list[int]`` (each row's count for the stage, instead of the plan's) and ``merge_groups(signals,
vision_hidden, is_kept) -> [B, V] long | None`` (a group id >= 0 for dropped vision tokens to merge, -1
elsewhere). Each group becomes ONE token, the mean of its members' layer outputs, that sits in the slot of
its last member (its anchor): the anchor's position id (``compact``: its rank among the remaining slots),
its attention-mask row and column and its KV-cache entry in every later layer, so a group of one token is
that token itself, and no token before a member can see the merged token. It stays a vision token for later
stages; ``ForwardRecord.kept`` lists it (by its anchor) and ``ForwardRecord.merged`` names the anchors. A
scorer without these methods (or returning None) prunes exactly as before.

Tokens keep their original rotary positions unless the plan says ``positions="compact"``; position
ids are sliced on their last axis, so multimodal ``[3, B, S]`` positions (Qwen2-VL) work alike. Rows
may hold different numbers of image tokens and keep different numbers: a shorter pruned row is padded
on the left with filler slots (a copy of its first slot as a query, masked out as a key), so every
row of the batch runs exactly as it would alone. The model-specific parts (where the layers, rotary
embedding and projections are) come from the family adapter (``research.models``).
What the engine reads from transformers' calls, and the error when a release changes it, is in
``research.pruning.compat``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from research.models import adapter_for
from research.models.base import UnsupportedModel, sliding_window_refusal, vision_merging_refusal
from research.pruning.compat import (
    cached_length,
    describe_failure,
    failed_inside_transformers,
    failing_layer,
    find_cache,
    is_static,
    required,
    unsupported_call,
)
from research.pruning.plan import INTERFACE, PruningPlan
from research.pruning.signals import (
    InterfaceSignals,
    Signals,
    TokenLayout,
    gather_positions,
    gather_seq,
    read_layout,
)
from research.pruning.timing import Timer
from research.pruning.vision_merge import VisionTowerMerge

FILLER = torch.iinfo(torch.long).max  # key column of a filler slot: beyond any mask, so always masked out


@dataclass
class ForwardRecord:
    """What one prefill did."""

    tokens_per_layer: list[float]  # vision tokens each decoder layer ran on (mean over rows)
    # per stage: [B, k] input_ids indices of kept vision tokens; -1 pads rows that kept fewer
    kept: list[Tensor] = field(default_factory=list)
    locations: list[int] = field(default_factory=list)  # the stage of each entry of ``kept``
    # location -> [B, g] input_ids indices of the anchors of the merged tokens that stage made (-1 pads)
    merged: dict[int, Tensor] = field(default_factory=dict)
    scoring_seconds: float = 0.0  # time spent computing signals, scores and top-k
    hook_seconds: float = 0.0  # host time inside the engine's hooks during prefill (scoring included)


@dataclass
class _Cut:
    """A pruned sequence, in the coordinates of an earlier one (the model's input, or decoder layer 0's).

    Rows that keep fewer tokens than the longest are padded on the left with filler slots: a filler
    repeats the row's first slot as a query and is masked out as a key (its column is ``FILLER``).
    """

    kept: Tensor  # [B, S'] indices of the kept slots (fillers: the row's first kept slot)
    filler: Tensor  # [B, S'] bool
    shift: Tensor  # [B, S'] dropped tokens before each kept slot (compact positions subtract it)
    dropped: Tensor  # [B, 1] dropped tokens of each row
    has_fillers: bool  # some row keeps fewer slots than the longest (known in Python: no host sync)

    def then(self, local: _Cut) -> _Cut:
        """This cut followed by ``local`` (a cut of this cut's sequence)."""
        return _Cut(
            kept=self.kept.gather(1, local.kept),
            filler=local.filler | self.filler.gather(1, local.kept),
            shift=self.shift.gather(1, local.kept) + local.shift,
            dropped=self.dropped + local.dropped,
            has_fillers=self.has_fillers or local.has_fillers,
        )

    def columns(self, base_len: int, width: int) -> Tensor:
        """[B, width]: each key slot's original column (fillers: ``FILLER``), then the tokens appended
        after the prompt (decode)."""
        tail = torch.arange(base_len, base_len + width - self.kept.shape[1], device=self.kept.device)
        kept = self.kept.masked_fill(self.filler, FILLER)
        return torch.cat([kept, tail.expand(kept.shape[0], -1)], dim=1)


@dataclass
class _Stage:
    location: int
    cut: _Cut  # of decoder layer 0's input
    call_kwargs: dict[str, dict] = field(default_factory=dict)  # layer type -> sliced layer kwargs, current call


@dataclass
class DeepStack:
    """DeepStack features (Qwen3-VL) the engine adds itself, in the current sequence's slots: ``features[j]``
    [B, S, D] is added to decoder layer ``j``'s output at the ``visual`` [B, S] slots, as the language model
    would (``hidden + feature`` there, in the hidden states' dtype); a cut gathers them with the hidden states."""

    visual: Tensor  # [B, S] bool
    features: list[Tensor | None]  # per layer [B, S, D] (zeros off the visual slots); None once added

    def keep(self, kept: Tensor, filler: Tensor) -> None:
        self.visual = self.visual.gather(1, kept) & ~filler
        self.features = [None if f is None else gather_seq(f, kept) for f in self.features]


class _ForwardState:
    """Per-prefill state, kept through the cached decode steps that follow it."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout  # of the current sequence (updated by every stage)
        self.input_len = layout.seq_len
        self.is_prefill = True
        self.past_len = 0  # tokens in decoder layer 0's KV cache before the current call
        self.static_cache = False  # the KV cache has a fixed length (masks span it)
        self.interface: InterfaceSignals | None = None
        self.input_ids: Tensor | None = None
        self.interface_cut: _Cut | None = None  # of the model's input, at location -1
        self.num_vision: list[int] = []  # each row's image tokens in the input
        self.remaining: list[int] = []  # each row's vision tokens left after the stages so far
        self.base_len = layout.seq_len
        self.stages: list[_Stage] = []
        self.base_kwargs: dict[str, dict] = {}  # layer type -> the kwargs its first layer received this call
        self.model_mask: Tensor | None = None  # the multimodal model's 2-D attention mask of the current call
        self.captured: dict[str, Tensor] = {}
        self.capture_paused = False  # the engine itself is running projections (next-layer signals)
        self.memo: dict = {}
        self.recycled: tuple[Tensor, Tensor] | None = None  # ([B, S] anchor slots, [B, S, D] their merged states)
        self.deepstack: DeepStack | None = None  # the visual features still to add (Qwen3-VL), current slots
        self.timer = Timer()
        self.record = ForwardRecord(tokens_per_layer=[])
        self.recorded = False
        self.hook_seconds = 0.0


def _masked_value(mask: Tensor) -> Any:
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def slice_mask(mask: Tensor, rows: Tensor | None, columns: Tensor) -> Tensor:
    """Remap a 4D mask [B or 1, 1, R, W] to the kept tokens.

    ``rows`` [B, R'] selects query rows (None keeps them); ``columns`` [B, C] gives, for each key
    slot of the pruned layer, the original column it corresponds to; slots whose column is >= W
    (never written in a static cache) are masked out.
    """
    batch = columns.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, 1, rows.shape[1], mask.shape[-1]))
    original_width = mask.shape[-1]
    out = mask.gather(3, columns.clamp(max=original_width - 1)[:, None, None, :].expand(
        batch, 1, mask.shape[2], columns.shape[1]))
    overflow = columns >= original_width  # no host sync: filling nothing is cheaper than asking
    return out.masked_fill(overflow[:, None, None, :], _masked_value(mask))


def _key_width(mask_width: int, pruned: int, static_cache: bool) -> int:
    """Key length a layer that runs ``pruned`` fewer tokens than layer 0 attends over in this call:
    a static cache's fixed length (every layer's), otherwise the mask's width less the pruned keys."""
    return mask_width if static_cache else mask_width - pruned


def causal_mask(query_len: int, past_len: int, device: torch.device) -> Tensor:
    """[1, 1, Q, past + Q] bool (True = attend): the causal mask of ``query_len`` queries after ``past_len``
    cached tokens, none of them padding: what a layer computes when transformers hands it no mask."""
    keys = torch.arange(past_len + query_len, device=device)
    queries = torch.arange(past_len, past_len + query_len, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


def _cut(dropped: Tensor, new_len: int, has_fillers: bool) -> _Cut:
    """The cut that removes the slots ``dropped`` [B, S], ``new_len`` the most slots a row keeps; shorter
    rows get filler slots on the left (``has_fillers``: some row is shorter)."""
    batch, seq_len = dropped.shape
    counts = seq_len - dropped.sum(1, keepdim=True)  # [B, 1] slots each row keeps
    order = torch.argsort(dropped.to(torch.uint8), dim=1, stable=True)[:, :new_len]  # kept slots first, ascending
    position = torch.arange(new_len, device=dropped.device).expand(batch, new_len)
    fillers = new_len - counts  # [B, 1]
    kept = order.gather(1, (position - fillers).clamp(min=0))
    shift = dropped.long().cumsum(1).gather(1, kept)  # dropped slots before each kept one
    return _Cut(kept=kept, filler=position < fillers, shift=shift, dropped=seq_len - counts, has_fillers=has_fillers)


def checked_scores(scorer: Any, scores: Any, shape: torch.Size, valid: Tensor | None = None) -> Tensor:
    """``scores`` if they are a floating tensor of ``shape`` [B, V], finite on the ``valid`` [B, V]
    entries (all if None); else one line naming the scorer."""
    name = getattr(scorer, "registry_name", None) or type(scorer).__name__
    if not isinstance(scores, Tensor):
        raise ValueError(f"scorer {name} returned {type(scores).__name__}, expected a float tensor {list(shape)}")
    if tuple(scores.shape) != tuple(shape):
        raise ValueError(f"scorer {name} returned scores of shape {list(scores.shape)}, expected {list(shape)} "
                         "(batch, remaining vision tokens)")
    if not scores.is_floating_point():
        raise ValueError(f"scorer {name} returned {scores.dtype} scores, expected a floating dtype")
    finite = torch.isfinite(scores) if valid is None else torch.isfinite(scores) | ~valid
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"scorer {name} returned {bad} non-finite score(s) (NaN or inf) of {scores.numel()}")
    return scores


class PruningEngine:
    """Context manager that installs the pruning hooks on ``model`` and removes them on exit.

    Example::

        plan = PruningPlan.of(locations=[2, 8], keep=[192, 64])
        with PruningEngine(model, SCORERS.get("text_prior")(), plan) as engine:
            model.generate(**inputs, max_new_tokens=8)
        engine.records[-1].tokens_per_layer

    Args:
        model: a model with an adapter (``research.models.adapter_for``).
        scorer: any registered scorer instance (``score(signals) -> [B, V]``, higher = keep).
        plan: where to prune and how many vision tokens to keep.
        replay: optional per-stage [B, k] input_ids indices of vision tokens to keep instead of
            scoring (reproduces an earlier forward's choice exactly).
        observe: observer mode: called in prefill with the ``Signals`` of every layer in
            ``observe_layers`` (default: all), before any pruning at that layer. With an empty plan
            nothing is pruned and the model's outputs are untouched.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: Any,
        plan: PruningPlan,
        replay: Sequence[Tensor] | None = None,
        adapter: Any | None = None,
        observe: Callable[[Signals], None] | None = None,
        observe_layers: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.scorer = scorer
        self.plan = plan
        plan.check(self.adapter.num_layers)
        if plan.positions == "compact" and self.adapter.compact_positions_refusal() is not None:
            raise UnsupportedModel(self.adapter.compact_positions_refusal())
        self._fixed_vision = self.adapter.vision_layout(self.adapter.model.config).image_tokens
        self._window = self.adapter.sliding_window(self.adapter.model.config) if plan.locations else None
        if replay is not None and len(replay) != len(plan.locations):
            raise ValueError(f"replay has {len(replay)} stages but the plan has {len(plan.locations)}")
        self.replay = list(replay) if replay is not None else None
        if hasattr(scorer, "bind"):
            scorer.bind(self.adapter)  # scorers with models of their own (e.g. a CLIP text tower) load them here
        self.records: list[ForwardRecord] = []
        self._handles: list[Any] = []
        self._state: _ForwardState | None = None
        self._vision: dict[str, Tensor] = {}  # latest vision-tower captures, consumed at the interface
        self._layer_locations = [x for x in plan.locations if x != INTERFACE]
        self._tower_merge = self._vision_merge() if getattr(scorer, "needs_vision_merging", False) else None
        # DeepStack features are added by the engine, on the kept slots, before any hook reads a layer's output
        self._deepstack_layers = self.adapter.deepstack_layers(self.adapter.model.config)
        self._layer_types = self.adapter.layer_types()  # layers of one type receive the same mask and rotary
        self._first_of_type = {kind: self._layer_types.index(kind) for kind in dict.fromkeys(self._layer_types)}
        self.observe = observe
        self._observed = [] if observe is None else list(
            range(self.adapter.num_layers) if observe_layers is None else observe_layers
        )

    def _vision_merge(self) -> VisionTowerMerge:
        """The vision-tower merge a merging scorer asks for: it shortens each image to the plan's interface keep
        count, so the plan must be one stage at location -1; one line otherwise (or if the family cannot)."""
        name = getattr(self.scorer, "registry_name", None) or type(self.scorer).__name__
        if not self.adapter.supports_vision_merging:
            raise UnsupportedModel(vision_merging_refusal(type(self.adapter), name))
        if list(self.plan.locations) != [INTERFACE]:
            raise ValueError(f"scorer {name!r} merges inside the vision tower: its plan is one stage at location "
                             f"-1 (the merged image span enters the LLM), got locations {list(self.plan.locations)}")
        sites = self.adapter.vision_merge_sites()
        keep = self.plan.stage_keep(0, sites.image_tokens)
        return VisionTowerMerge(sites, self.scorer.merge_options(sites, keep))

    # ---- context manager -------------------------------------------------------------------------
    def __enter__(self) -> PruningEngine:
        a = self.adapter
        self._hook_pre(a.multimodal_model, self._on_multimodal_input)
        self._hook_pre(a.language_model, self._on_llm_input)
        captures = [(a.vision_tower, "vision_states")]
        if a.vision_attention() is not None:
            vision_q, vision_k, _, _ = a.vision_attention()
            captures += [(vision_q, "vision_q"), (vision_k, "vision_k")]
        for module, name in captures:
            self._handles.append(module.register_forward_hook(self._timed(self._make_capture(name))))
        if self._tower_merge is not None:
            self._handles += self._tower_merge.install()
        for idx in range(self._deepstack_layers):  # before the pruning hooks, which see the features added
            hook = self._timed(self._make_deepstack_hook(idx))
            self._handles.append(a.decoder_layers[idx].register_forward_hook(hook))
        if self._layer_locations:  # each type's first layer keeps the call's kwargs; layers after the first stage
            after = range(self._layer_locations[0] + 1, a.num_layers)  # slice them
            for idx in sorted(set(self._first_of_type.values()) | set(after)):
                self._hook_pre(a.decoder_layers[idx], self._make_layer_input_hook(idx))
        for idx in sorted(set(self._layer_locations) | set(self._observed)):
            queries, keys = a.query_key_sources(idx)
            self._handles.append(queries.register_forward_hook(self._timed(self._make_capture("q"))))
            self._handles.append(keys.register_forward_hook(self._timed(self._make_capture("k"))))
            self._handles.append(
                a.decoder_layers[idx].register_forward_hook(self._timed(self._make_layer_hook(idx)), with_kwargs=True)
            )
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._finish_prefill()
        pruned = self._state is not None and (bool(self._state.stages) or self._state.interface_cut is not None)
        self._state = None
        if exc is not None and pruned and failed_inside_transformers(tb):
            raise describe_failure(exc, self.scorer, failing_layer(tb, self.adapter.decoder_layers)) from exc

    @property
    def last(self) -> ForwardRecord:
        """The record of the most recent prefill."""
        self._finish_prefill()
        return self.records[-1]

    def _hook_pre(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(self._timed(fn), with_kwargs=True))

    def _timed(self, fn: Any) -> Any:
        """``fn`` with its wall time added to the current forward's ``hook_seconds``."""

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args)
            if self._state is not None:
                self._state.hook_seconds += time.perf_counter() - start
            return result

        return timed

    def _finish_prefill(self) -> None:
        st = self._state
        if st is not None and not st.recorded:
            st.record.scoring_seconds = st.timer.seconds
            st.record.hook_seconds = st.hook_seconds
            self.records.append(st.record)
            st.recorded = True

    # ---- hooks -----------------------------------------------------------------------------------
    def _on_multimodal_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward with a non-empty KV cache after a prefill is one of its decode steps (whatever
        tokens it feeds, the image token's id included); otherwise image tokens start a prefill."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the pruning engine needs input_ids to locate the image tokens")
        self._finish_prefill()
        decode = self._state is not None and cached_length(find_cache(args, kwargs)) > 0
        if isinstance(kwargs.get("attention_mask"), dict) and (
                decode or bool((input_ids == self.adapter.image_token_id).any())):
            raise unsupported_call("the model got one prepared mask per layer type (generate() builds them for a "
                                   "static KV cache): the pruning engine reads padding from the 2-D mask and cannot "
                                   "remap masks sized on fixed caches; use a dynamic cache")
        if decode:
            self._state.is_prefill = False  # a cached decode step of the last prefill
            self._state.base_kwargs = {}
            self._state.model_mask = kwargs.get("attention_mask")
            for stage in self._state.stages:
                stage.call_kwargs = {}
        elif bool((input_ids == self.adapter.image_token_id).any()):
            layout = read_layout(input_ids, self.adapter.image_token_id, kwargs.get("attention_mask"))
            self._state = _ForwardState(layout)
            self._state.input_ids = input_ids
            counts = layout.vision_counts.tolist()  # the prefill's one host sync: stages then plan in Python
            self._state.num_vision, self._state.remaining = counts, list(counts)
            self.plan.check(self.adapter.num_layers, self._fixed_vision)
            self._state.record.tokens_per_layer = self._tokens_per_layer(counts)
        else:
            self._state = None  # text-only forward: nothing to prune

    def _on_llm_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        st = self._state
        if st is None:
            return None
        cache = find_cache(args, kwargs)
        st.past_len, st.static_cache = cached_length(cache), is_static(cache)
        inputs_embeds = required(kwargs, "inputs_embeds", "the language model")
        if self._window is not None:
            self._check_window(st, inputs_embeds.shape[1])
        if st.is_prefill:
            _, _, vision_heads, vision_scaling = self.adapter.vision_attention() or (None, None, 0, 1.0)
            st.interface = InterfaceSignals(
                inputs_embeds, st.layout, input_ids=st.input_ids,
                vision_q=self._vision.pop("vision_q", None), vision_k=self._vision.pop("vision_k", None),
                vision_heads=vision_heads, vision_scaling=vision_scaling,
                vision_states=self._vision.pop("vision_states", None),
            )
            if self._tower_merge is not None:
                st.interface.merged_sizes = self._tower_merge.slot_sizes(st.layout.vision_valid,
                                                                         self._keep_counts(st, 0))
            if self._deepstack_layers:
                kwargs = dict(kwargs)
                st.deepstack = self._take_deepstack(kwargs, inputs_embeds)
        unpruned = (args, kwargs) if st.is_prefill and self._deepstack_layers else None  # DeepStack taken out
        if not self.plan.locations or self.plan.locations[0] != INTERFACE:
            return unpruned
        if st.is_prefill:
            self._prune_at_interface(st, kwargs)
        cut = st.interface_cut
        if cut is None:
            return unpruned
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        pruned = st.input_len - cut.kept.shape[1]
        if isinstance(mask, dict):  # one mask per layer type (Gemma 3)
            if st.is_prefill:
                kwargs["attention_mask"] = {kind: self._sliced_type_mask(st, cut, each) for kind, each in mask.items()}
            # a decode step: the types' masks agree; the language model builds them from the remapped 2-D one
            mask = None if st.is_prefill else self._decode_mask(st, inputs_embeds, pruned)
        elif mask is None:
            # No mask means no padding. Kept tokens keep position ids with gaps, which transformers reads as
            # packed sequences when it gets no mask, and filler slots must be masked: say "no padding" explicitly.
            width = st.input_len if st.is_prefill else st.past_len + pruned + inputs_embeds.shape[1]
            mask = torch.ones(inputs_embeds.shape[0], width, dtype=torch.long, device=inputs_embeds.device)
        if st.is_prefill:
            if st.recycled is not None:  # tokens merged at the interface replace their anchors' embeddings
                anchor, merged = st.recycled
                inputs_embeds, st.recycled = torch.where(anchor[..., None], merged, inputs_embeds), None
            kwargs["inputs_embeds"] = gather_seq(inputs_embeds, cut.kept)
        if mask is not None:
            if mask.dim() == 2:
                columns = cut.columns(st.input_len, mask.shape[1] - pruned)
                overflow = columns >= mask.shape[1]  # fillers: padding
                kwargs["attention_mask"] = mask.gather(1, columns.clamp(max=mask.shape[1] - 1)).masked_fill(overflow, 0)
            elif st.is_prefill:
                width = _key_width(mask.shape[-1], pruned, st.static_cache)
                kwargs["attention_mask"] = slice_mask(mask, cut.kept, cut.columns(st.input_len, width))
            # A 4D mask in decode was built by generate() from the (already pruned) cache of layer 0:
            # it is in cache coordinates and needs no remapping.
        kwargs["position_ids"] = self._positions_at_interface(st, kwargs, cut)
        return args, kwargs

    @staticmethod
    def _decode_mask(st: _ForwardState, inputs_embeds: Tensor, pruned: int) -> Tensor:
        """The multimodal model's 2-D mask of this decode step (all ones where it got none), original columns."""
        if st.model_mask is not None:
            return st.model_mask
        width = st.past_len + pruned + inputs_embeds.shape[1]
        return torch.ones(inputs_embeds.shape[0], width, dtype=torch.long, device=inputs_embeds.device)

    def _sliced_type_mask(self, st: _ForwardState, cut: _Cut, mask: Tensor | None) -> Tensor | None:
        """One layer type's prefill mask (``[B or 1, 1, S, W]``, or None: transformers found it plainly causal and
        unpadded) sliced to the interface's kept tokens; a None one is made explicit when filler slots need hiding."""
        if mask is None:
            if not cut.has_fillers:
                return None  # causal over the kept tokens is causal
            mask = self._unmasked_causal(st, st.input_len)
        width = _key_width(mask.shape[-1], st.input_len - cut.kept.shape[1], st.static_cache)
        return slice_mask(mask, cut.kept, cut.columns(st.input_len, width))

    def _take_deepstack(self, kwargs: dict, inputs_embeds: Tensor) -> DeepStack | None:
        """Take the DeepStack inputs out of the language model's call (``kwargs``, edited) as dense per-layer
        features [B, S, D] on the visual slots, for the engine to add on the kept slots (``DeepStack``)."""
        mask_key, features_key = self.adapter.deepstack_keywords
        for key in (mask_key, features_key):
            if key not in kwargs:  # a renamed keyword: one line naming the installed transformers
                required(kwargs, key, "the language model")
        visual, features = kwargs[mask_key], kwargs[features_key]
        kwargs[mask_key] = kwargs[features_key] = None
        if features is None:
            return None
        visual = visual.to(inputs_embeds.device)
        dense = []
        for feature in features:  # [visual tokens of the batch, D], in row-major order of ``visual``
            full = inputs_embeds.new_zeros(inputs_embeds.shape)
            full[visual] = feature.to(inputs_embeds.device, inputs_embeds.dtype)
            dense.append(full)
        return DeepStack(visual=visual, features=dense)

    def _make_deepstack_hook(self, layer_idx: int) -> Any:
        """After decoder layer ``layer_idx`` (< the family's DeepStack depth) in prefill: add its features."""

        def add_features(module: nn.Module, args: tuple, output: Any) -> Any:
            st = self._state
            if st is None or not st.is_prefill or st.deepstack is None:
                return None
            deepstack = st.deepstack
            feature, deepstack.features[layer_idx] = deepstack.features[layer_idx], None
            if feature is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = torch.where(deepstack.visual[..., None], hidden + feature, hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return add_features

    def _check_window(self, st: _ForwardState, query_len: int) -> None:
        """Refuse, in one line, a sequence longer than the language model's sliding window: the window would be
        counted on the kept slots, not on the original positions as the unpruned model counts it."""
        length = st.input_len if st.is_prefill else st.past_len + st.input_len - st.base_len + query_len
        if length > self._window:
            raise UnsupportedModel(sliding_window_refusal(
                self.adapter.model_class, self._window, f"this sequence of {length} tokens (prompt and answer so far)"))

    def _prune_at_interface(self, st: _ForwardState, kwargs: dict) -> None:
        if self._is_no_op(st, stage=0):
            self._record_no_op(st, stage=0)
            return
        with st.timer.span(kwargs["inputs_embeds"].device):
            signals = Signals(layout=st.layout, interface=st.interface, layer_idx=INTERFACE, stage=0, memo=st.memo)
            # the image embeddings are what an interface merge averages (``merge_groups``, as after a layer)
            cut, selected, selected_valid = self._select(st, signals, stage=0, hidden=kwargs["inputs_embeds"])
        st.layout = st.layout.keep(cut.kept, cut.filler, selected, selected_valid)
        st.interface_cut = cut
        st.base_len = cut.kept.shape[1]  # decoder layer 0 sees the pruned sequence
        if st.deepstack is not None:
            st.deepstack.keep(cut.kept, cut.filler)

    def _positions_at_interface(self, st: _ForwardState, kwargs: dict, cut: _Cut) -> Tensor:
        """Position ids [..., B, S'] of the kept tokens: their original ones, or renumbered (compact)."""
        pos = kwargs.get("position_ids")
        pruned = st.input_len - cut.kept.shape[1]
        if st.is_prefill:
            if pos is None:
                pos = torch.arange(st.input_len, device=cut.kept.device)[None]
            pos = gather_positions(pos, cut.kept)
            return pos - cut.shift if self.plan.positions == "compact" else pos
        if pos is None:
            query_len = kwargs["inputs_embeds"].shape[1]
            pos = (torch.arange(query_len, device=cut.kept.device) + st.past_len + pruned)[None]
        return pos - cut.dropped if self.plan.positions == "compact" else pos

    def _make_capture(self, name: str) -> Any:
        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            if name.startswith("vision"):
                # generate() encodes the images before the model's forward (mm_encoder_outputs), so the
                # vision tower may run before this forward's state exists: keep the latest, per engine.
                self._vision[name] = getattr(output, "last_hidden_state", output)
                return
            st = self._state
            if st is not None and st.is_prefill and not st.capture_paused:
                st.captured[name] = self.adapter.flat_projection(output)  # [B, S, H*hd]

        return capture

    def _make_layer_hook(self, layer_idx: int) -> Any:
        """After decoder layer ``layer_idx`` in prefill: observe its signals, then prune if it is a location."""
        stage_idx = self.plan.locations.index(layer_idx) if layer_idx in self.plan.locations else None

        def after_layer(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            st = self._state
            if st is None or not st.is_prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            signals = self._layer_signals(st, layer_idx, stage_idx, kwargs, hidden)
            if self.observe is not None and layer_idx in self._observed:
                self.observe(signals)
            if stage_idx is None:
                return None
            if self._is_no_op(st, stage_idx):
                self._record_no_op(st, stage_idx)
                return None  # nothing to prune: the stage is a no-op
            with st.timer.span(hidden.device):
                cut, selected, selected_valid = self._select(st, signals, stage_idx, hidden)
            st.layout = st.layout.keep(cut.kept, cut.filler, selected, selected_valid)
            st.stages.append(_Stage(layer_idx, st.stages[-1].cut.then(cut) if st.stages else cut))
            if st.recycled is not None:  # merged tokens replace their anchors' states
                anchor, merged = st.recycled
                hidden, st.recycled = torch.where(anchor[..., None], merged, hidden), None
            hidden = gather_seq(hidden, cut.kept)
            if st.deepstack is not None:
                st.deepstack.keep(cut.kept, cut.filler)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return after_layer

    def _layer_signals(
        self, st: _ForwardState, layer_idx: int, stage_idx: int | None, kwargs: dict, hidden: Tensor
    ) -> Signals:
        """Lazy signals of a decoder layer from its captured q/k and its (sliced) kwargs; ``hidden``
        [B, S, D] is the layer's output, from which ``signals.next_layer`` is computed if asked."""
        cos, sin = required(kwargs, "position_embeddings", f"decoder layer {layer_idx}")
        signals = Signals(
            layout=st.layout, interface=st.interface, layer_idx=layer_idx,
            stage=stage_idx if stage_idx is not None else -1 - layer_idx,
            q=st.captured.pop("q", None), k=st.captured.pop("k", None), cos=cos, sin=sin,
            mask=kwargs.get("attention_mask"), num_heads=self.adapter.num_heads,
            num_kv_heads=self.adapter.num_kv_heads, scaling=self.adapter.attention_scaling(layer_idx),
            memo=st.memo, hidden=hidden, final_norm=self.adapter.final_norm,
            **self._position_signals(kwargs, layer_idx),
        )
        if layer_idx + 1 < self.adapter.num_layers:
            signals.next_layer_fn = lambda: self._next_layer_signals(st, signals, hidden)
        return signals

    def _position_signals(self, kwargs: dict, layer_idx: int) -> dict:
        """The layer's 1-D position ids and the model's rotary embedding (``Signals.keys(from_row_start=True)``
        renumbers with them); none for multimodal positions, which transformers numbers per row already."""
        if self.adapter.position_axes > 1:
            return {}
        return {"position_ids": kwargs.get("position_ids"), "rotary": self.adapter.rotary_for(layer_idx)}

    def _next_layer_signals(self, st: _ForwardState, current: Signals, hidden: Tensor) -> Signals:
        """Signals of layer ``current.layer_idx + 1`` on the current, still unpruned sequence.

        Every decoder layer of one type receives the same rotary cos/sin and mask (sliced alike after each
        stage), so a next layer of the current one's type gets the current layer's; one of another type (Gemma 3)
        gets its own type's rotary at the current layer's positions, and the current mask, which its type's
        equals while the sequence fits the sliding window (longer ones are refused).
        """
        nxt = current.layer_idx + 1
        cos, sin = current.cos, current.sin
        if self._layer_types[nxt] != self._layer_types[current.layer_idx]:
            if current.position_ids is None:
                raise unsupported_call(f"decoder layer {current.layer_idx} received no position_ids: the pruning "
                                       f"engine cannot rotate layer {nxt}'s keys with its own type's rotary embedding")
            cos, sin = self.adapter.rotary_for(nxt)(hidden, position_ids=current.position_ids)
        st.capture_paused = True  # these calls are ours: not the next layer's own forward
        try:
            with torch.no_grad():
                q, k = self.adapter.queries_keys(nxt, hidden)  # [B, S, H*hd], [B, S, Hkv*hd]
        finally:
            st.capture_paused = False
        return Signals(
            layout=current.layout, interface=current.interface, layer_idx=nxt, stage=current.stage,
            q=q, k=k, cos=cos, sin=sin, mask=current.mask, num_heads=self.adapter.num_heads,
            num_kv_heads=self.adapter.num_kv_heads, scaling=self.adapter.attention_scaling(nxt),
            memo=current.memo, view="next",
        )

    def _record_no_op(self, st: _ForwardState, stage: int) -> None:
        """A stage that keeps every remaining token is recorded too, so ``kept`` replays as the plan."""
        st.record.kept.append(st.layout.vision_orig.masked_fill(~st.layout.vision_valid, -1))
        st.record.locations.append(self.plan.locations[stage])

    def _is_no_op(self, st: _ForwardState, stage: int) -> bool:
        """True if every row keeps all its remaining vision tokens at ``stage`` (and nothing is replayed, and the
        scorer does not set its own counts)."""
        if self.replay is not None or hasattr(self.scorer, "keep_counts"):
            return False
        return all(k >= r for k, r in zip(self._keep_counts(st, stage), st.remaining))

    def _keep_counts(self, st: _ForwardState, stage: int) -> list[int]:
        """Vision tokens each row keeps after ``stage``: the plan's count for it, at most what it has left."""
        return [min(self.plan.stage_keep(stage, n), r) for n, r in zip(st.num_vision, st.remaining)]

    def _tokens_per_layer(self, counts: list[int]) -> list[float]:
        """Vision tokens each decoder layer runs on, the mean over rows of ``counts`` image tokens."""
        per_row = [self.plan.tokens_per_layer(self.adapter.num_layers, n) for n in counts]
        means = [sum(layer) / len(layer) for layer in zip(*per_row)]
        return [int(m) if m == int(m) else m for m in means]

    def _select(
        self, st: _ForwardState, signals: Signals, stage: int, hidden: Tensor | None = None
    ) -> tuple[_Cut, Tensor, Tensor]:
        """The cut of the current sequence, the kept vision entries' indices [B, k] (ascending) and
        their validity [B, k] (rows that keep fewer than the batch's most are padded). After a decoder layer
        (``hidden`` [B, S, D], its output) a scorer may set the counts and merge dropped tokens (module doc)."""
        layout = st.layout
        valid = layout.vision_valid  # [B, V]
        if self.replay is not None:
            wanted = self.replay[stage].to(layout.vision_orig.device)
            is_kept = (layout.vision_orig[:, :, None] == wanted[:, None, :]).any(-1) & valid  # [B, V]
            keep = is_kept.sum(1).tolist()
        else:
            keep = self._keep_counts(st, stage)
            if hidden is not None and hasattr(self.scorer, "keep_counts"):
                keep = [min(max(int(k), 0), r) for k, r in zip(self.scorer.keep_counts(signals, keep), st.remaining)]
            scores = checked_scores(self.scorer, self.scorer.score(signals), layout.vision.shape, valid)  # [B, V]
            top = scores.masked_fill(~valid, float("-inf")).topk(max(keep), dim=1).indices
            rank = torch.arange(top.shape[1], device=top.device)
            within = rank[None, :] < torch.tensor(keep, device=top.device)[:, None]  # [B, k]: a row's first keep_b
            is_kept = torch.zeros_like(valid).scatter_(1, top, within)
            if hidden is not None and hasattr(self.scorer, "merge_groups"):
                is_kept = self._recycle(st, signals, hidden, is_kept, stage)
                keep = is_kept.sum(1).tolist()
        k = max(keep)
        selected = torch.argsort((~is_kept).to(torch.uint8), dim=1, stable=True)[:, :k]  # ascending
        selected_valid = torch.arange(k, device=selected.device)[None, :] < is_kept.sum(1, keepdim=True)
        dropped_counts = [r - kept for r, kept in zip(st.remaining, keep)]
        new_len = layout.seq_len - min(dropped_counts)
        st.remaining = keep
        dropped = torch.zeros(layout.valid.shape[0], layout.seq_len + 1, dtype=torch.bool, device=valid.device)
        dropped = dropped.scatter_(1, layout.vision_scatter_index(), valid & ~is_kept)[:, : layout.seq_len]  # [B, S]
        st.record.kept.append(layout.vision_orig.gather(1, selected).masked_fill(~selected_valid, -1))
        st.record.locations.append(self.plan.locations[stage])
        if self.replay is None and hidden is not None and (
                hasattr(self.scorer, "keep_counts") or hasattr(self.scorer, "merge_groups")):
            self._record_counts(st, self.plan.locations[stage])
        return _cut(dropped, new_len, has_fillers=len(set(dropped_counts)) > 1), selected, selected_valid

    def _recycle(self, st: _ForwardState, signals: Signals, hidden: Tensor, is_kept: Tensor, stage: int) -> Tensor:
        """Merge the groups the scorer names among the dropped vision tokens: ``is_kept`` [B, V] plus each
        group's anchor (its last member). The anchors' merged states wait in ``st.recycled`` for the cut."""
        layout = st.layout
        valid = layout.vision_valid
        vision_hidden = gather_seq(hidden, layout.vision)  # [B, V, D]
        groups = self.scorer.merge_groups(signals, vision_hidden, is_kept)
        if groups is None:
            return is_kept
        name = getattr(self.scorer, "registry_name", None) or type(self.scorer).__name__
        if not isinstance(groups, Tensor) or groups.shape != valid.shape or groups.is_floating_point():
            raise ValueError(f"scorer {name} returned merge groups {getattr(groups, 'shape', type(groups).__name__)}"
                             f", expected an integer tensor {list(valid.shape)} (group id, -1 = not merged)")
        member = groups >= 0
        if bool((member & (is_kept | ~valid)).any()):
            raise ValueError(f"scorer {name} merges kept or padding vision tokens: only dropped ones may be merged")
        slot = torch.where(member, groups + 1, 0)  # [B, V]: column 0 collects the tokens in no group
        num_groups = int(slot.max()) + 1
        if num_groups == 1:  # nothing to merge
            return is_kept
        sizes = torch.zeros_like(slot[:, :num_groups]).scatter_add(1, slot, torch.ones_like(slot))
        index = torch.arange(slot.shape[1], device=slot.device).expand_as(slot)
        last = torch.full_like(sizes, -1).scatter_reduce(1, slot, index, reduce="amax")  # [B, G+1] anchor index
        anchor = member & (index == last.gather(1, slot))  # [B, V]
        scatter = layout.vision_scatter_index()
        at_slots = torch.zeros(hidden.shape[0], layout.seq_len + 1, dtype=torch.bool, device=hidden.device)
        at_slots = at_slots.scatter_(1, scatter, anchor)[:, : layout.seq_len]  # [B, S]

        def group_means(values: Tensor) -> Tensor:
            """[B, S, D]: at each vision slot, the mean of ``values`` [B, V, D] over its group (float32 sums)."""
            sums = values.new_zeros(slot.shape[0], num_groups, values.shape[-1], dtype=torch.float32)
            sums = sums.scatter_add(1, slot[..., None].expand_as(values), values.float())
            means = (sums / sizes.clamp(min=1)[..., None]).to(values.dtype)  # [B, G+1, D]
            spread = values.new_zeros(values.shape[0], layout.seq_len + 1, values.shape[-1])
            return spread.scatter(1, scatter[..., None].expand_as(values), means.gather(
                1, slot[..., None].expand_as(values)))[:, : layout.seq_len]

        st.recycled = (at_slots, group_means(vision_hidden))
        if st.deepstack is not None:  # a merged token gets its members' mean DeepStack features too
            st.deepstack.features = [None if f is None else torch.where(
                at_slots[..., None], group_means(gather_seq(f, layout.vision)), f) for f in st.deepstack.features]
        order = torch.argsort((~anchor).to(torch.uint8), dim=1, stable=True)[:, : int(anchor.sum(1).max())]
        st.record.merged[self.plan.locations[stage]] = layout.vision_orig.gather(1, order).masked_fill(
            ~anchor.gather(1, order), -1)
        return is_kept | anchor

    def _record_counts(self, st: _ForwardState, location: int) -> None:
        """Vision tokens the layers after ``location`` run on, as this stage left them (the scorer set the
        counts or merged tokens, so the plan's counts are not what ran)."""
        mean = sum(st.remaining) / len(st.remaining)
        for layer in range(location + 1, len(st.record.tokens_per_layer)):
            st.record.tokens_per_layer[layer] = int(mean) if mean == int(mean) else mean

    def _make_layer_input_hook(self, layer_idx: int) -> Any:
        """Before decoder layer ``layer_idx``: the first layer of a type keeps the call's kwargs that every layer
        of that type receives; a layer after a stage gets its type's sliced to that stage's kept tokens."""
        kind = self._layer_types[layer_idx]

        def slice_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            st = self._state
            if st is None:
                return None
            if layer_idx == self._first_of_type[kind]:
                st.base_kwargs[kind] = kwargs
            if kind not in st.base_kwargs or self._layer_types[0] not in st.base_kwargs:
                return None
            stage = None
            for candidate in st.stages:
                if candidate.location < layer_idx:
                    stage = candidate
            if stage is None:
                return None
            if kind not in stage.call_kwargs:
                stage.call_kwargs[kind] = self._stage_kwargs(st, stage, kind)
            return args, {**kwargs, **stage.call_kwargs[kind]}

        return slice_inputs

    @staticmethod
    def _unmasked_causal(st: _ForwardState, query_len: int) -> Tensor:
        """The mask decoder layer 0 ran without (causal, no padding), made explicit in its coordinates."""
        if st.static_cache:
            raise unsupported_call("a static KV cache came without an attention mask: the pruning engine cannot "
                                   "tell which of its slots are written")
        return causal_mask(query_len, st.past_len, st.layout.valid.device)

    def _stage_kwargs(self, st: _ForwardState, stage: _Stage, kind: str) -> dict:
        """The kwargs of this call's layers of type ``kind`` sliced to the stage's kept tokens. A decode step's mask
        is layer 0's for every type (module doc: they agree there, and only layer 0's has layer 0's width)."""
        base = st.base_kwargs[kind]
        cut = stage.cut
        cos, sin = required(base, "position_embeddings", f"decoder layer {self._first_of_type[kind]}")
        pos = base.get("position_ids")
        mask = (base if st.is_prefill else st.base_kwargs[self._layer_types[0]]).get("attention_mask")
        if mask is None and cut.has_fillers:
            # transformers' sdpa path passes no mask when nothing is padded; filler slots must still be hidden
            mask = self._unmasked_causal(st, cos.shape[-2])
        out: dict[str, Any] = {}
        if st.is_prefill:
            cos, sin = gather_seq(cos, cut.kept), gather_seq(sin, cut.kept)
            if pos is not None:
                pos = gather_positions(pos, cut.kept)
        if mask is not None:
            width = _key_width(mask.shape[-1], st.base_len - cut.kept.shape[1], st.static_cache)
            columns = cut.columns(st.base_len, width)
            out["attention_mask"] = slice_mask(mask, cut.kept if st.is_prefill else None, columns)
        if self.plan.positions == "compact" and pos is not None:
            pos = pos - (cut.shift if st.is_prefill else cut.dropped)
            cos, sin = self.adapter.rotary_for(self._first_of_type[kind])(cos, position_ids=pos)
        out["position_embeddings"] = (cos, sin)
        if pos is not None:
            out["position_ids"] = pos
        return out
