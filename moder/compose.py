"""Composing retrieved experts into prototypes for classes the hub has never trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.experts import ContextExperts, Experts, LoraExperts
from moder.prompts import PromptSet, class_chunks, classes_per_chunk, encode_prototypes, keep_frozen_prefix
from moder.text import TextTower

# Composed expert parameters held at once (64 M floats, 256 MB in fp32): query classes are composed and
# encoded in chunks under this bound, whatever the task's class count, k and expert size. The default
# (rank 1 on ViT-B-16's last layer, k = 4) is 33 K floats per query; rank 4 on all 12 layers at k = 16 is
# 6.3 M, about 10 queries per chunk.
COMPOSED_FLOATS = 64 * 2**20


def _retrieved(stacked: Tensor, null: Tensor, indices: Tensor) -> Tensor:
    """[Q, k, ...] rows of `stacked` (the hub's experts, may be empty), the null expert where an index is -1.

    Gathered row by row from the hub's tensors: concatenating the null expert to the hub would copy
    every hub expert (gigabytes at MTIL scale) for one extra row."""
    is_null = indices < 0
    if stacked.shape[0] == 0:
        rows = null.expand(*indices.shape, *null.shape[1:])
    else:
        rows = torch.index_select(stacked, 0, indices.clamp(min=0).reshape(-1)).view(*indices.shape, *stacked.shape[1:])
    shape = (*indices.shape, *(1,) * (stacked.dim() - 1))
    return torch.where(is_null.view(shape), null[0].to(rows.dtype), rows)


def compose_parameters(bank: Experts | None, null: Experts, indices: Tensor, weights: Tensor) -> Experts:
    """One expert per query row from its k retrieved experts' parameters.

    Context tokens: the weighted mean of the retrieved tokens. LoRA: the weighted sum of
    the retrieved deltas, sum_j w_j B_j A_j, which is exactly the rank k*r LoRA
    [w_1 B_1 ... w_k B_k] @ [A_1; ...; A_k], so composed experts batch like any other.
    """
    queries, k = indices.shape
    if isinstance(null, ContextExperts):
        stacked = null.ctx[:0] if bank is None else _context(bank).ctx
        return ContextExperts(torch.einsum("qk,qkcd->qcd", weights, _retrieved(stacked, null.ctx, indices)))
    lora = None if bank is None else _lora(bank)
    a, b = {}, {}
    for target in null.a:
        a_rows = _retrieved(null.a[target][:0] if lora is None else lora.a[target], null.a[target], indices)
        b_rows = _retrieved(null.b[target][:0] if lora is None else lora.b[target], null.b[target], indices)
        a[target] = a_rows.reshape(queries, k * a_rows.shape[2], a_rows.shape[3])
        b[target] = (b_rows * weights[:, :, None, None]).permute(0, 2, 1, 3).reshape(queries, b_rows.shape[2], -1)
    return LoraExperts(a, b, null.scaling)


def _context(bank: Experts) -> ContextExperts:
    if not isinstance(bank, ContextExperts):
        raise ValueError("the hub holds LoRA experts but the null expert is a context expert")
    return bank


def _lora(bank: Experts) -> LoraExperts:
    if not isinstance(bank, LoraExperts):
        raise ValueError("the hub holds context experts but the null expert is a LoRA expert")
    return bank


def composition_chunk(null: Experts, k: int, prompts_per_class: int) -> int:
    """Query classes composed and encoded together, under COMPOSED_FLOATS and the no-grad prompt bound."""
    per_expert = sum(p[0].numel() for p in null.parameters())
    return max(1, min(classes_per_chunk(prompts_per_class), COMPOSED_FLOATS // (k * per_expert)))


@torch.no_grad()
def compose_outputs(
    tower: TextTower, prompts: PromptSet, bank: Experts | None, null: Experts, indices: Tensor, weights: Tensor
) -> Tensor:
    """Weighted mean of the retrieved experts' prototypes of each query class, renormalised."""
    queries, k = indices.shape
    outputs = []
    for j in range(k):
        experts = compose_parameters(bank, null, indices[:, j : j + 1], torch.ones(queries, 1))
        outputs.append(expert_prototypes(tower, prompts, experts))
    return F.normalize(torch.einsum("qk,kqd->qd", weights, torch.stack(outputs)), dim=-1)


@torch.no_grad()
def compose_prototypes(
    tower: TextTower,
    prompts: PromptSet,
    bank: Experts | None,
    null: Experts,
    indices: Tensor,
    weights: Tensor,
    space: str,
) -> Tensor:
    """Refined prototypes for unseen classes, composed in parameter or output space, in chunks of query
    classes (`composition_chunk`) so that memory does not grow with the number of queries."""
    if space not in ("parameter", "output"):
        raise ValueError(f"unknown composition space {space!r}; allowed: parameter, output")
    step = composition_chunk(null, indices.shape[1], prompts.per_class)
    parts = []
    for chunk in class_chunks(prompts.n_classes, step):
        # every retrieved expert acts from the null expert's first block on; output space encodes a chunk k times
        chunk_prompts = keep_frozen_prefix(tower, prompts.select(chunk), null.first_layer)
        chunk_indices, chunk_weights = indices[chunk], weights[chunk]
        if space == "parameter":
            composed = compose_parameters(bank, null, chunk_indices, chunk_weights)
            parts.append(expert_prototypes(tower, chunk_prompts, composed))
        else:
            parts.append(compose_outputs(tower, chunk_prompts, bank, null, chunk_indices, chunk_weights))
    return torch.cat(parts)


def displace_prototypes(zeroshot: Tensor, moves: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Each query's zero-shot prototype moved by the weighted mean of its retrieved hub classes' moves (what each
    one's own expert did to its prototype: own minus zero-shot), renormalised; the null expert moves nothing.

    What an expert learns of its dataset (the shift of its images, the backbone's confusions there) shows in how
    far and where it moved its class's prototype; neighbours in a dataset tend to move alike. Nothing is
    encoded: a query costs k rows of `moves` [hub rows, d], whatever the expert's size.
    """
    if moves.shape[0] == 0:
        return F.normalize(zeroshot.float(), dim=-1)
    rows = moves[indices.clamp(min=0)] * (indices >= 0).unsqueeze(-1).to(moves.dtype)
    return F.normalize(zeroshot.float() + torch.einsum("qk,qkd->qd", weights.to(moves.dtype), rows), dim=-1)


@torch.no_grad()
def expert_prototypes(tower: TextTower, prompts: PromptSet, experts: Experts) -> Tensor:
    """Each class encoded by its own expert (expert row c for class c), in memory-bounded chunks."""
    return encode_prototypes(
        tower, prompts, experts, torch.arange(prompts.n_classes), chunk_classes=classes_per_chunk(prompts.per_class)
    )


def smooth_toward_zeroshot(own: Tensor, zeroshot: Tensor, alpha: float) -> Tensor:
    """alpha * own + (1 - alpha) * zero-shot, renormalised; the endpoints are returned as they are
    (alpha = 1: `own`, alpha = 0: `zeroshot`), so those settings reproduce them bit for bit."""
    if alpha == 1.0:
        return own
    if alpha == 0.0:
        return zeroshot.to(own.dtype).clone()
    return F.normalize(alpha * own + (1.0 - alpha) * zeroshot, dim=-1)


@torch.no_grad()
def seen_prototypes(tower: TextTower, prompts: PromptSet, experts: Experts, zeroshot: Tensor, alpha: float) -> Tensor:
    """Each seen class's own expert, interpolated toward its zero-shot prototype (alpha=1: expert only)."""
    return smooth_toward_zeroshot(expert_prototypes(tower, prompts, experts), zeroshot, alpha)
