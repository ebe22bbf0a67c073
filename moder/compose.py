"""Composing retrieved experts into prototypes for classes the hub has never trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.experts import ContextExperts, Experts, LoraExperts, concat_experts
from moder.prompts import NO_GRAD_CHUNK, PromptSet, encode_prototypes
from moder.text import TextTower


def _with_null(bank: Experts | None, null: Experts, indices: Tensor) -> tuple[Experts, Tensor]:
    """Append the null expert as the bank's last row and point index -1 at it."""
    full = null if bank is None else concat_experts([bank, null])
    return full, torch.where(indices < 0, len(full) - 1, indices)


def compose_parameters(bank: Experts | None, null: Experts, indices: Tensor, weights: Tensor) -> Experts:
    """One expert per query row from its k retrieved experts' parameters.

    Context tokens: the weighted mean of the retrieved tokens. LoRA: the weighted sum of
    the retrieved deltas, sum_j w_j B_j A_j, which is exactly the rank k*r LoRA
    [w_1 B_1 ... w_k B_k] @ [A_1; ...; A_k], so composed experts batch like any other.
    """
    full, rows = _with_null(bank, null, indices)
    queries, k = rows.shape
    if isinstance(full, ContextExperts):
        return ContextExperts(torch.einsum("qk,qkcd->qcd", weights, full.ctx[rows]))
    a = {t: v[rows].reshape(queries, k * v.shape[1], v.shape[2]) for t, v in full.a.items()}
    b = {
        t: (v[rows] * weights[:, :, None, None]).permute(0, 2, 1, 3).reshape(queries, v.shape[1], k * v.shape[2])
        for t, v in full.b.items()
    }
    return LoraExperts(a, b, full.scaling)


@torch.no_grad()
def compose_outputs(
    tower: TextTower, prompts: PromptSet, bank: Experts | None, null: Experts, indices: Tensor, weights: Tensor
) -> Tensor:
    """Weighted mean of the retrieved experts' prototypes of each query class, renormalised."""
    full, rows = _with_null(bank, null, indices)
    queries, k = rows.shape
    repeated = prompts.select(torch.arange(queries).repeat_interleave(k))
    outputs = encode_prototypes(tower, repeated, full, rows.reshape(-1), chunk_classes=NO_GRAD_CHUNK).view(
        queries, k, -1
    )
    return F.normalize(torch.einsum("qk,qkd->qd", weights, outputs), dim=-1)


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
    """Refined prototypes for unseen classes, composed in parameter or output space."""
    if space == "parameter":
        composed = compose_parameters(bank, null, indices, weights)
        return encode_prototypes(tower, prompts, composed, torch.arange(prompts.n_classes), chunk_classes=NO_GRAD_CHUNK)
    if space == "output":
        return compose_outputs(tower, prompts, bank, null, indices, weights)
    raise ValueError(f"unknown composition space {space!r}; allowed: parameter, output")


@torch.no_grad()
def seen_prototypes(tower: TextTower, prompts: PromptSet, experts: Experts, zeroshot: Tensor, alpha: float) -> Tensor:
    """Each seen class's own expert, interpolated toward its zero-shot prototype (alpha=1: expert only)."""
    own = encode_prototypes(tower, prompts, experts, torch.arange(prompts.n_classes), chunk_classes=NO_GRAD_CHUNK)
    return F.normalize(alpha * own + (1.0 - alpha) * zeroshot, dim=-1)
