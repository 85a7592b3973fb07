"""Signals a scorer may ask for, computed lazily from what the layer already computed.

At a pruning layer the engine holds references to that layer's own ``q_proj`` / ``k_proj``
outputs (captured by forward hooks, no extra projection), the layer's rotary cos/sin and
attention mask. Attention rows are recomputed from those for the requested query subset only,
so SDPA stays the model's attention implementation and nothing is run twice.

``Signals.next_layer`` is the same view for the attention the NEXT decoder layer would compute on
the full (not yet pruned) sequence: only when a scorer asks, the engine applies that layer's
``input_layernorm``, ``q_proj`` and ``k_proj`` to the current layer's output (PyramidDrop ranks
this way).

After a decoder layer, ``Signals.hidden`` is that layer's output and ``normed_hidden`` the same through the
language model's final norm (DART compares those); ``keys()`` are the layer's keys after the rotary embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Where each kind of token sits in the current (possibly already pruned) sequence.

    ``text`` are the question tokens: the non-padding tokens after the last image token, read from
    ``input_ids`` per sample. Rows have different numbers of them; ``text_valid`` marks real ones.
    Rows may also hold different numbers of image tokens (an image's size may set them): ``V`` is the
    batch's largest count and ``vision_valid`` marks each row's real entries; the others point at slot 0
    (a valid index to gather from; the engine never keeps, drops or scores them).
    """

    vision: Tensor  # [B, V] slots of the remaining vision tokens (ascending over valid entries)
    vision_orig: Tensor  # [B, V] their indices in the model's input_ids
    vision_rank: Tensor  # [B, V] their indices among the image's tokens (= patch index for LLaVA)
    text: Tensor  # [B, T] slots of question tokens (the last T slots)
    text_valid: Tensor  # [B, T] bool
    valid: Tensor  # [B, S] bool, False on left padding (and on filler slots of shorter pruned rows)
    vision_valid: Tensor | None = None  # [B, V] bool, False past a row's own image tokens (None: all real)

    def __post_init__(self) -> None:
        if self.vision_valid is None:
            self.vision_valid = torch.ones_like(self.vision, dtype=torch.bool)

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]

    @property
    def vision_counts(self) -> Tensor:
        """[B] each row's number of remaining vision tokens."""
        return self.vision_valid.sum(1)

    def vision_scatter_index(self) -> Tensor:
        """[B, V] ``vision`` with invalid entries sent to column S (scatter into S + 1 columns, drop the last)."""
        return torch.where(self.vision_valid, self.vision, self.seq_len)

    def keep(self, kept: Tensor, filler: Tensor, selected: Tensor, selected_valid: Tensor) -> TokenLayout:
        """Layout after keeping sequence slots ``kept`` [B, S'] (ascending after the row's ``filler``
        slots [B, S'], which pad shorter rows on the left), among them the vision tokens ``selected``
        [B, k] (indices into this layout's vision dimension; ``selected_valid`` [B, k] marks real ones)."""
        batch, new_len = kept.shape
        position = torch.arange(new_len, device=kept.device).expand(batch, new_len)
        new_slot = torch.zeros(batch, self.seq_len + 1, dtype=kept.dtype, device=kept.device)
        new_slot = new_slot.scatter_(1, torch.where(filler, self.seq_len, kept), position)[:, : self.seq_len]
        vision = new_slot.gather(1, self.vision.gather(1, selected))
        return TokenLayout(
            vision=torch.where(selected_valid, vision, 0),
            vision_orig=self.vision_orig.gather(1, selected),
            vision_rank=self.vision_rank.gather(1, selected),
            text=new_slot.gather(1, self.text),
            text_valid=self.text_valid,
            valid=self.valid.gather(1, kept) & ~filler,
            vision_valid=selected_valid,
        )


def read_layout(input_ids: Tensor, image_token_id: int, attention_mask: Tensor | None) -> TokenLayout:
    """Image and question positions of each row of ``input_ids`` [B, S] (left padding allowed).

    One host sync (the largest number of image tokens in a row); rows may hold different numbers.
    """
    is_image = input_ids == image_token_id  # [B, S]
    counts = is_image.sum(1)  # [B]
    num_vision = int(counts.max())
    batch, seq_len = input_ids.shape
    # Stable argsort puts image slots first, in ascending order, without a data-dependent shape.
    vision = torch.argsort((~is_image).to(torch.uint8), dim=1, stable=True)[:, :num_vision]  # [B, V]
    rank = torch.arange(num_vision, device=input_ids.device).expand(batch, num_vision)
    vision_valid = rank < counts[:, None]
    vision = torch.where(vision_valid, vision, 0)
    valid = padding_from_mask(attention_mask, seq_len) if attention_mask is not None else torch.ones_like(is_image)
    last_image = vision.gather(1, (counts[:, None] - 1).clamp(min=0))  # [B, 1]
    num_text = int((seq_len - 1 - last_image).max()) if num_vision else seq_len
    text = torch.arange(seq_len - num_text, seq_len, device=input_ids.device).expand(batch, num_text)
    text_valid = (text > last_image) & valid.gather(1, text)
    return TokenLayout(vision, vision.clone(), rank, text, text_valid, valid, vision_valid)


def padding_from_mask(mask: Tensor, seq_len: int) -> Tensor:
    """[B, S] bool, False on padding, from a 2D mask or a 4D one (generate builds 4D masks for
    static caches): the last query of a prompt attends to every non-padding token."""
    if mask.dim() == 2:
        return mask.bool()
    last_row = mask[:, 0, -1, :seq_len]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gather_seq(x: Tensor, index: Tensor) -> Tensor:
    """``x`` [B or 1, S, ...] gathered along the sequence at ``index`` [B, S'] -> [B, S', ...]."""
    batch = index.shape[0]
    x = x.expand(batch, *x.shape[1:])
    view = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, view.expand(*index.shape, *x.shape[2:]))


def gather_positions(positions: Tensor, index: Tensor) -> Tensor:
    """Position ids ``[..., B or 1, S]`` (sequence on the last axis: ``[B, S]``, or multimodal rotary
    ``[3, B, S]`` / ``[4, B, S]``) gathered at ``index`` [B, S'] -> ``[..., B, S']``."""
    lead = positions.shape[:-2]
    positions = positions.expand(*lead, index.shape[0], positions.shape[-1])
    return positions.gather(-1, index.expand(*lead, *index.shape))


def rotated_keys(k: Tensor, cos: Tensor, sin: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hkv, S, hd] keys after the rotary embedding, as the layer's attention (and its KV cache) holds them,
    from ``k`` [B, S, Hkv*hd] (the ``k_proj`` output) and the layer's ``cos`` / ``sin`` [B or 1, S, hd]."""
    batch, seq_len, width = k.shape
    keys = k.view(batch, seq_len, num_kv_heads, width // num_kv_heads).transpose(1, 2)
    return keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)


def query_attention(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    query_slots: Tensor,
    mask: Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    scaling: float,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Head-averaged softmax attention of the queries at ``query_slots`` over all keys.

    Args:
        q: [B, S, H*hd] the layer's q_proj output. k: [B, S, Hkv*hd] its k_proj output.
        cos, sin: [B or 1, S, hd] the layer's rotary embedding. query_slots: [B, Q].
        mask: the layer's 4D mask [B or 1, 1, S, >=S] (bool: True = attend; float: additive), or
            None for plain causal attention.
        dtype: None keeps the float32 softmax through the head mean; a dtype casts the softmax
            weights to it before the head mean, as eager attention in half precision returns them
            (``softmax(..., dtype=float32).to(query.dtype)``), so near-ties round like the authors' code.
    Returns: [B, Q, S] float32 (or ``dtype``); rows that attend to nothing are 0.
    """
    batch, seq_len, _ = k.shape
    head_dim = k.shape[-1] // num_kv_heads
    groups = num_heads // num_kv_heads
    num_queries = query_slots.shape[1]
    keys = rotated_keys(k, cos, sin, num_kv_heads)  # [B, Hkv, S, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B or 1, 1, S, hd]
    queries = gather_seq(q, query_slots).view(batch, num_queries, num_heads, head_dim).transpose(1, 2)
    cos_q = gather_seq(cos.squeeze(1), query_slots).unsqueeze(1)
    sin_q = gather_seq(sin.squeeze(1), query_slots).unsqueeze(1)
    queries = queries * cos_q + rotate_half(queries) * sin_q  # [B, H, Q, hd]
    # Grouped-query attention without materialising repeated keys: head h uses kv head h // groups.
    queries = queries.reshape(batch, num_kv_heads, groups * num_queries, head_dim)
    scores = (queries @ keys.transpose(-1, -2)).float() * scaling  # [B, Hkv, g*Q, S]
    scores = scores.view(batch, num_heads, num_queries, seq_len)
    if mask is None:
        keys_pos = torch.arange(seq_len, device=k.device)
        allowed = keys_pos[None, None, :] <= query_slots[:, :, None]  # [B, Q, S]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    else:
        rows = mask.expand(batch, *mask.shape[1:])[:, 0, :, :seq_len]  # [B, S, S]
        rows = rows.gather(1, query_slots[:, :, None].expand(batch, num_queries, seq_len))  # [B, Q, S]
        if rows.dtype == torch.bool:
            scores = scores.masked_fill(~rows[:, None], float("-inf"))
        else:
            scores = scores + rows[:, None].float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dtype is not None:
        probs = probs.to(dtype)
    return probs.mean(1)  # [B, Q, S]


def cls_attention(q: Tensor, k: Tensor, num_heads: int, scaling: float) -> Tensor:
    """Head-mean attention of a ViT's CLS token (position 0) over its patch tokens.

    Args: q, k [B, 1+P, H*hd] outputs of the layer's q_proj / k_proj. Returns: [B, P].
    """
    batch, tokens, width = k.shape
    head_dim = width // num_heads
    query = q[:, :1].view(batch, 1, num_heads, head_dim).transpose(1, 2)  # [B, H, 1, hd]
    keys = k.view(batch, tokens, num_heads, head_dim).transpose(1, 2)  # [B, H, 1+P, hd]
    probs = torch.softmax((query @ keys.transpose(-1, -2)).float() * scaling, dim=-1)
    return probs.mean(1)[:, 0, 1:]


@dataclass
class InterfaceSignals:
    """What is known at the vision-language interface, before the LLM runs (original token order)."""

    inputs_embeds: Tensor  # [B, S, D] the LLM's input embeddings (text + projected image features)
    layout: TokenLayout  # of the complete input
    input_ids: Tensor | None = None  # [B, S]
    vision_q: Tensor | None = None  # [B, 1+P, Hv*hd] q_proj output of the vision tower's feature layer
    vision_k: Tensor | None = None
    vision_heads: int = 0
    vision_scaling: float = 1.0
    vision_states: Tensor | None = None  # [B, 1+P, Dv] the vision tower's last hidden state
    # [B, V] patches merged into each image slot by a vision-tower merge (0: an empty slot, dropped); None without
    merged_sizes: Tensor | None = None

    @cached_property
    def text_embeds(self) -> Tensor:
        """[B, T, D] original embeddings of the question tokens (invalid rows zeroed)."""
        return gather_seq(self.inputs_embeds, self.layout.text) * self.layout.text_valid[..., None]

    @cached_property
    def vision_embeds(self) -> Tensor:
        """[B, V, D] projected vision tokens as they enter the LLM."""
        return gather_seq(self.inputs_embeds, self.layout.vision)

    @cached_property
    def cls_attention(self) -> Tensor:
        """[B, V] the vision tower's CLS-to-patch attention at its feature layer (visual saliency)."""
        if self.vision_q is None:
            raise RuntimeError("the vision tower's CLS attention was not captured (no pixel_values in this forward?)")
        attention = cls_attention(self.vision_q, self.vision_k, self.vision_heads, self.vision_scaling)
        return attention[:, -self.layout.vision.shape[1]:]  # "default" drops CLS: patches are the image tokens

    @cached_property
    def patch_states(self) -> Tensor:
        """[B, V, Dv] the vision tower's last hidden state of each image token's patch."""
        if self.vision_states is None:
            raise RuntimeError("the vision tower's output was not captured (no pixel_values in this forward?)")
        return self.vision_states[:, -self.layout.vision.shape[1]:]


@dataclass
class Signals:
    """Lazily computed scoring inputs at one pruning location (shapes per property).

    ``view`` says whose attention ``q`` / ``k`` hold: ``"layer"``, the layer the engine prunes after
    (its own projections); ``"next"``, the layer after it, recomputed on the same, still unpruned
    sequence (see ``next_layer``).
    """

    layout: TokenLayout  # the current sequence's layout
    interface: InterfaceSignals  # embeddings at the LLM input, for prompt-guided scorers
    layer_idx: int  # -1 at the vision-language interface
    stage: int
    q: Tensor | None = None  # [B, S, H*hd]
    k: Tensor | None = None  # [B, S, Hkv*hd]
    cos: Tensor | None = None
    sin: Tensor | None = None
    mask: Tensor | None = None
    num_heads: int = 0
    num_kv_heads: int = 0
    scaling: float = 1.0
    memo: dict = field(default_factory=dict)  # shared by all stages of one forward
    view: str = "layer"
    next_layer_fn: Callable[[], Signals] | None = field(default=None, repr=False)  # set by the engine
    hidden: Tensor | None = field(default=None, repr=False)  # [B, S, D] the layer's output (``view="layer"``)
    final_norm: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)  # the LLM's last norm
    position_ids: Tensor | None = None  # [B or 1, S] the layer's 1-D position ids, if it received them
    rotary: Callable[..., tuple[Tensor, Tensor]] | None = field(default=None, repr=False)  # rotary(x, position_ids=)

    @cached_property
    def next_layer(self) -> Signals:
        """The same signals for decoder layer ``layer_idx + 1``, on the current sequence before the cut.

        Computed on first use only: that layer's ``input_layernorm -> q_proj / k_proj`` applied to this
        layer's output hidden states, with the rotary cos/sin and mask that layer would receive (the
        ones of this layer: the cut has not happened yet). Its attention is what ``layer_idx + 1``
        would compute without pruning at this location (PyramidDrop's ranking signal).
        """
        if self.next_layer_fn is None:
            where = "at the vision-language interface" if self.layer_idx < 0 else f"after layer {self.layer_idx}"
            raise RuntimeError(f"no next-layer attention {where}: it exists only after a decoder layer that is "
                               "followed by another one")
        return self.next_layer_fn()

    @cached_property
    def normed_hidden(self) -> Tensor:
        """[B, S, D] the layer's output through the language model's final norm (``model.norm``), in the
        model's dtype: the states DART compares (``self.norm(layer_outputs[0])`` in its code)."""
        if self.hidden is None or self.final_norm is None:
            where = "at the vision-language interface" if self.layer_idx < 0 else f"in the {self.view} view"
            raise RuntimeError(f"no layer output hidden states {where}: they exist only after a decoder layer")
        with torch.no_grad():
            return self.final_norm(self.hidden)

    def keys(self, from_row_start: bool = False) -> Tensor:
        """[B, Hkv, S, hd] the layer's keys after the rotary embedding (what its KV cache stores).

        ``from_row_start``: rotated at each row's positions counted from its first real token, as the row alone
        gets them. Attention is relative and does not care, but a key's own values do: a plain forward of a
        left-padded batch numbers the padding too (LLaVA's default positions), generate() does not. Multimodal
        (several-axis) positions are numbered per row already and are used as they are.
        """
        if self.k is None:
            raise RuntimeError("no attention projections at the vision-language interface (location -1)")
        cos, sin = self.row_start_rotary() if from_row_start else (self.cos, self.sin)
        return rotated_keys(self.k, cos, sin, self.num_kv_heads)

    def row_start_rotary(self) -> tuple[Tensor, Tensor]:
        """cos / sin [B, S, hd] of the positions each row would have alone (see ``keys``): the layer's own where
        they already start at 0 on every row's first real token."""
        if self.position_ids is None or self.rotary is None:
            return self.cos, self.sin
        first_real = self.layout.valid.to(torch.uint8).argmax(1, keepdim=True)  # [B, 1]
        positions = self.position_ids.expand(first_real.shape[0], -1)  # [B, S]
        start = positions.gather(1, first_real)  # [B, 1]
        if not bool(start.any()):
            return self.cos, self.sin
        return self.rotary(self.k, position_ids=positions - start)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in (its projections' output dtype)."""
        if self.q is None:
            raise RuntimeError("no attention projections at the vision-language interface (location -1)")
        return self.q.dtype

    def attention(self, query: str, dtype: torch.dtype | None = None) -> Tensor:
        """[B, Q, S] head-mean attention from ``query`` in {"text", "last", "all"} over all tokens.

        ``dtype``: None averages the float32 softmax over heads; a dtype (e.g. ``self.dtype``) casts
        the softmax weights to it first, like eager attention weights in that dtype.
        """
        memo = self.memo.setdefault(("attention", self.layer_idx, self.view), {})
        if (query, dtype) in memo:
            return memo[(query, dtype)]
        if self.q is None:
            raise RuntimeError(
                "attention signals exist only inside the LLM; this scorer cannot act at the "
                "vision-language interface (location -1)"
            )
        slots = {
            "text": lambda: self.layout.text,
            "last": lambda: self.layout.text[:, -1:],
            "all": lambda: torch.arange(self.layout.seq_len, device=self.q.device).expand(self.q.shape[0], -1),
        }
        if query not in slots:
            raise ValueError(f"unknown attention query {query!r}; choose one of {sorted(slots)}")
        result = query_attention(
            self.q, self.k, self.cos, self.sin, slots[query](), self.mask,
            self.num_heads, self.num_kv_heads, self.scaling, dtype,
        )
        memo[(query, dtype)] = result
        return result

    @property
    def text_valid(self) -> Tensor:
        """[B, T] bool: real question tokens."""
        return self.layout.text_valid

    @property
    def t2t(self) -> Tensor:
        """[B, T, T] attention among question tokens (rows = queries); padding rows/cols are 0."""
        a = gather_seq(self.attention("text").transpose(1, 2), self.layout.text).transpose(1, 2)
        valid = self.layout.text_valid
        return a * valid[:, :, None] * valid[:, None, :]

    @property
    def t2v(self) -> Tensor:
        """[B, T, V] attention from question tokens to the remaining vision tokens."""
        a = gather_seq(self.attention("text").transpose(1, 2), self.layout.vision).transpose(1, 2)
        return a * self.layout.text_valid[:, :, None]

    @property
    def last_t2v(self) -> Tensor:
        """[B, V] attention from the last instruction token to the vision tokens."""
        return self.last_to_vision()

    @property
    def all_t2v(self) -> Tensor:
        """[B, V] attention received by each vision token, averaged over all OTHER non-padding queries."""
        return self.all_to_vision()

    def last_to_vision(self, dtype: torch.dtype | None = None) -> Tensor:
        """``last_t2v`` with the softmax cast to ``dtype`` before the head mean (see ``attention``)."""
        return self.attention("last", dtype)[:, 0].gather(1, self.layout.vision)

    def all_to_vision(self, dtype: torch.dtype | None = None) -> Tensor:
        """``all_t2v`` with the softmax cast to ``dtype`` before the head mean (see ``attention``).

        Each vision token's own row (its attention to itself) is left out: the mean over the
        ``n - 1`` other non-padding queries of the row (queries before the token cannot see it: 0).
        """
        a = self.attention("all", dtype).float()  # [B, S, S] rows = queries
        valid = self.layout.valid
        itself = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
        a = (a * valid[:, :, None]).masked_fill(itself, 0.0)  # padding rows and the diagonal out
        received = a.sum(1) / (valid.sum(1, keepdim=True) - 1).clamp(min=1)  # [B, S]
        return received.gather(1, self.layout.vision)

    @property
    def num_vision(self) -> int:
        return self.layout.vision.shape[1]

    @property
    def vision_valid(self) -> Tensor:
        """[B, V] bool: real vision entries (rows may hold fewer image tokens than the batch's largest)."""
        return self.layout.vision_valid

    def remaining(self, per_image_token: Tensor) -> Tensor:
        """Select, from a [B, V0, ...] tensor over the image's original tokens, the remaining ones."""
        return gather_seq(per_image_token, self.layout.vision_rank)

    @property
    def cls_attention(self) -> Tensor:
        """[B, V] vision-tower CLS attention of the remaining vision tokens."""
        return self.remaining(self.interface.cls_attention)

    @property
    def vision_embeds(self) -> Tensor:
        """[B, V, D] LLM input embeddings of the remaining vision tokens."""
        return self.remaining(self.interface.vision_embeds)

    @property
    def patch_states(self) -> Tensor:
        """[B, V, Dv] vision-tower last hidden states of the remaining vision tokens."""
        return self.remaining(self.interface.patch_states)
