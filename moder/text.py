"""The frozen CLIP text encoder, run functionally so that every sequence may carry its own expert.

open_clip's modules hold the weights; this module only re-expresses their forward pass with
two additions: per-sequence context tokens or LoRA deltas (batched with bmm, never a loop
over experts), and truncation of each batch to its longest prompt. The causal mask means no
position reads a later one, and the pooled feature is read at the end-of-text token, so the
truncated result equals full-context encoding while skipping the padding.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from torch import Tensor, nn

from moder.experts import ContextExperts, Experts, LoraExperts
from moder.names import PromptError, check_class_names
from moder.params import LORA_MODULES

_LORA_ATTN_IN, _LORA_ATTN_OUT, _LORA_FC, _LORA_PROJ = LORA_MODULES


class UnsupportedTextTower(ValueError):
    """The model's text encoder is not a standard open_clip causal transformer."""


class TextTower:
    """A view on a frozen open_clip model's text encoder."""

    # The last block computes only the position pooling reads; False runs every position through it, as
    # open_clip does (the reference tests/test_text.py compares with).
    pool_last_block = True

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        # open_clip's towers are read by attribute; they carry no type information
        text: Any = model.text if hasattr(model, "text") else model
        if not hasattr(text, "transformer") or not hasattr(text, "token_embedding"):
            raise UnsupportedTextTower(
                f"{type(text).__name__} is not an open_clip text transformer "
                "(Hugging Face text towers are not supported)"
            )
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTextTower("text towers with a CLS embedding (CoCa) are not supported")
        self.blocks: list[ResidualAttentionBlock] = list(text.transformer.resblocks)
        for i, block in enumerate(self.blocks):
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
                raise UnsupportedTextTower(f"text block {i} is {type(block).__name__}, not a ResidualAttentionBlock")
        self.token_embedding: nn.Embedding = text.token_embedding
        self.positional_embedding: Tensor = text.positional_embedding
        self.ln_final: nn.Module = text.ln_final
        self.text_projection = text.text_projection
        self.attn_mask: Tensor | None = text.attn_mask
        self.pool_type: str = text.text_pool_type if hasattr(text, "text_pool_type") else text.pool_type
        self.eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        self.cast_dtype = text.transformer.get_cast_dtype()
        self.tokenizer = tokenizer

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def lora_shapes(self, targets: list[str]) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each targeted linear map."""
        shapes = {}
        for target in targets:
            layer, module = target.split(".")
            weight = self.linear_weight(self.blocks[int(layer)], module)[0]
            shapes[target] = (int(weight.shape[0]), int(weight.shape[1]))
        return shapes

    @staticmethod
    def linear_weight(block: ResidualAttentionBlock, module: str) -> tuple[Tensor, Tensor | None]:
        if module == _LORA_ATTN_IN:
            return block.attn.in_proj_weight, block.attn.in_proj_bias
        layers: dict[str, Any] = {
            _LORA_ATTN_OUT: block.attn.out_proj,
            _LORA_FC: block.mlp.c_fc,
            _LORA_PROJ: block.mlp.c_proj,
        }
        layer = layers[module]
        return layer.weight, layer.bias

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token rows of `texts`; a text longer than the context would be cut (and could then equal
        another class's prompt), so it is refused."""
        encode, length = getattr(self.tokenizer, "encode", None), getattr(self.tokenizer, "context_length", None)
        if encode is not None and length is not None:
            too_long = [text for text in texts if len(encode(text)) + 2 > length]  # + start and end of text
            if too_long:
                raise PromptError(
                    f"{len(too_long)} prompt(s) longer than the text encoder's {length} tokens, "
                    f"e.g. {too_long[0][:120]!r}: shorten the class name or template"
                )
        return self.tokenizer(texts).to(self.device)

    def context_prompts(self, class_names: list[str], init_phrase: str) -> tuple[Tensor, Tensor]:
        """Tokens of "<init_phrase> <name>." and the embeddings of the init phrase's words.

        The init phrase's tokens sit right after start-of-text; a context expert replaces them.
        """
        if not hasattr(self.tokenizer, "encode"):
            raise UnsupportedTextTower(
                f"context experts need a BPE tokenizer with encode(); got {type(self.tokenizer).__name__}"
            )
        n_ctx = len(self.tokenizer.encode(init_phrase))
        if not n_ctx:
            raise ValueError(f"context init phrase {init_phrase!r} has no tokens")
        check_class_names(class_names)
        tokens = self.tokenize([f"{init_phrase} {name}." for name in class_names])
        with torch.no_grad():
            init_ctx = self.token_embedding(tokens[0, 1 : 1 + n_ctx]).float()
        return tokens, init_ctx

    def sequence_length(self, tokens: Tensor) -> int:
        """The shortest prefix that holds every sequence's pooled position."""
        if self.attn_mask is None or self.pool_type not in ("argmax", "eos"):
            return tokens.shape[1]  # bidirectional or last-token pooling reads the padding
        return int(cast(Tensor, self._pooled_positions(tokens)).max()) + 1

    def prefix(self, tokens: Tensor, layers: int) -> Tensor:
        """Hidden states of `tokens` entering block `layers` (after the embedding and the blocks before it),
        without gradient: they depend on the prompt only, so experts that act from block `layers` on can
        start from them (`encode(..., prefix=)`) instead of running the frozen blocks again. `tokens` as given
        (cut them to `sequence_length` first): `encode` of a batch of shorter prompts reads the leading
        positions, which the causal mask keeps exact."""
        with torch.no_grad():
            x, mask = self._embed(tokens, None, 1)
            for layer in range(layers):
                x = self._block(self.blocks[layer], layer, x, mask, None)
        return x

    def encode(
        self,
        tokens: Tensor,
        experts: Experts | None = None,
        expert_index: Tensor | None = None,
        normalize: bool = True,
        truncate: bool = True,
        sequences_per_expert: int = 1,
        prefix: tuple[Tensor, int] | None = None,
    ) -> Tensor:
        """Encode token sequences; with experts, each run of `sequences_per_expert` consecutive sequences
        (a class's prompts) shares expert row `expert_index[run]`.

        A LoRA expert is applied once per run, to the run's sequences stacked, so a class's expert is
        never copied per template (at 80 templates, 80 copies of every expert). `prefix` = (`prefix(tokens,
        m)` of these tokens, m) starts at block m; the experts must act on blocks m and after only.
        """
        group = None
        if experts is not None:
            if expert_index is None or expert_index.shape[0] * sequences_per_expert != tokens.shape[0]:
                raise ValueError(
                    f"expert_index must give one expert row per {sequences_per_expert} sequence(s), "
                    f"for {tokens.shape[0]} sequences"
                )
            if prefix is not None and experts.first_layer < prefix[1]:
                raise ValueError(f"experts act on block {experts.first_layer}, before the prefix's block {prefix[1]}")
            # experts and prototypes stay on the CPU (hub, training state); only the rows in use travel
            group = experts.select(expert_index).to(self.device)
        length = self.sequence_length(tokens) if truncate else tokens.shape[1]
        tokens = tokens[:, :length]
        if prefix is None:
            x, mask = self._embed(tokens, group, sequences_per_expert)
            start = 0
        else:
            hidden, start = prefix
            if hidden.shape[0] != tokens.shape[0] or hidden.shape[1] < length:
                raise ValueError(f"a prefix of shape {list(hidden.shape)} for {list(tokens.shape)} tokens")
            x, mask = hidden[:, :length], self._mask(length, hidden.dtype)
        lora = group if isinstance(group, LoraExperts) else None
        # the pooled feature reads one position: the last block computes only that position's output
        pooled = self._pooled_positions(tokens) if start < self.n_layers and self.pool_last_block else None
        pooled = None if pooled is None else pooled.to(x.device)
        for layer in range(start, self.n_layers):
            last = layer == self.n_layers - 1
            x = self._block(self.blocks[layer], layer, x, mask, lora, pooled if last else None)
        if pooled is None:
            x = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)
        else:
            x = self.ln_final(x[:, 0])
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def _mask(self, length: int, dtype: torch.dtype) -> Tensor | None:
        return None if self.attn_mask is None else self.attn_mask[:length, :length].to(dtype)

    def _embed(self, tokens: Tensor, group: Experts | None, sequences_per_expert: int) -> tuple[Tensor, Tensor | None]:
        """Token and position embeddings, a context expert's tokens in place of the init phrase's; the mask."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens).to(self.cast_dtype)
        if isinstance(group, ContextExperts):
            n_ctx = group.ctx.shape[1]
            ctx = group.ctx.to(x.dtype).repeat_interleave(sequences_per_expert, dim=0)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n_ctx :]], dim=1)
        x = x + self.positional_embedding[:length].to(self.cast_dtype)
        return x, self._mask(length, x.dtype)

    def _pooled_positions(self, tokens: Tensor) -> Tensor | None:
        """The one position per sequence that pooling reads (None where pooling reads more than one)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return torch.eq(tokens, cast(int, self.eos_id)).int().argmax(dim=-1)
        if self.pool_type in ("first", "last"):
            return torch.full((tokens.shape[0],), 0 if self.pool_type == "first" else tokens.shape[1] - 1)
        return None

    def _block(
        self,
        block: ResidualAttentionBlock,
        layer: int,
        x: Tensor,
        mask: Tensor | None,
        lora: LoraExperts | None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """One residual block; with `pooled` (a position per sequence), only those positions' outputs [N, 1, width]:
        every position's keys and values are needed, but nothing else past the last block."""
        attended = self._attention(block, layer, block.ln_1(x), mask, lora, pooled)
        if pooled is not None:
            x = x[torch.arange(x.shape[0], device=x.device), pooled].unsqueeze(1)
        x = x + block.ls_1(attended)
        h = self._linear(block, layer, _LORA_FC, block.ln_2(x), lora)
        return x + block.ls_2(self._linear(block, layer, _LORA_PROJ, block.mlp.gelu(h), lora))

    def _linear(
        self, block: ResidualAttentionBlock, layer: int, module: str, x: Tensor, lora: LoraExperts | None
    ) -> Tensor:
        weight, bias = self.linear_weight(block, module)
        y = F.linear(x, weight, bias)
        target = f"{layer}.{module}"
        if lora is not None and target in lora.a:
            a, b = lora.a[target].to(x.dtype), lora.b[target].to(x.dtype)
            runs = a.shape[0]  # the sequences of one run are consecutive: one [run * length, in] matrix each
            delta = torch.bmm(x.reshape(runs, -1, x.shape[-1]), a.transpose(1, 2))
            # in place: y is linear's fresh output, which autograd does not keep
            y.view(runs, -1, y.shape[-1]).baddbmm_(delta, b.transpose(1, 2), alpha=lora.scaling)
        return y

    def _attention(
        self,
        block: ResidualAttentionBlock,
        layer: int,
        x: Tensor,
        mask: Tensor | None,
        lora: LoraExperts | None,
        pooled: Tensor | None,
    ) -> Tensor:
        batch, length, width = x.shape
        heads = block.attn.num_heads
        qkv = self._linear(block, layer, _LORA_ATTN_IN, x, lora)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        if pooled is not None:  # the pooled positions' queries, each with its row of the mask
            rows = torch.arange(batch, device=x.device)
            q = q[rows, :, pooled].unsqueeze(2)
            mask = None if mask is None else mask[pooled].view(batch, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, q.shape[2], width)
        return self._linear(block, layer, _LORA_ATTN_OUT, out, lora)
