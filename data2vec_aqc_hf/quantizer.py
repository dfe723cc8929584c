"""Gumbel-softmax product quantizer and diversity loss (wav2vec 2.0, spec section 4).

Parameter names (`weight_proj`, `codevectors`) match transformers' `Wav2Vec2GumbelVectorQuantizer`, so weights move
between the two. Differences: the Gumbel noise can come from a `torch.Generator` or be passed in (its
uniform draws, so that the quantizer has no random draw inside a compiled step), the marginal code distribution
is returned per group (for per-group perplexity and the diversity loss over several views), and the
deterministic mode (hard arg-max codes, no noise) can be asked for in training mode too.
"""

from __future__ import annotations

import torch
from torch import nn


def gumbel_temperature(num_updates: torch.Tensor | int, max_temp: float, min_temp: float, decay: float):
    """Annealed temperature `max(max_temp * decay**num_updates, min_temp)` (wav2vec 2.0)."""
    num_updates = torch.as_tensor(num_updates, dtype=torch.float64)
    return torch.clamp(max_temp * decay**num_updates, min=min_temp)


def masked_mean_probs(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Marginal code distribution `(groups, entries)` of `probs` `(batch, frames, groups, entries)`, averaged over
    the frames where `mask` is True (all frames if None)."""
    if mask is None:
        return probs.flatten(0, 1).mean(0)
    weights = mask.to(probs.dtype)[..., None, None]
    return (probs * weights).sum((0, 1)) / weights.sum().clamp(min=1.0)


def perplexity_per_group(marginal: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each group's marginal distribution, shape `(groups,)`: V for uniform use, 1 for one code."""
    return torch.exp(-(marginal * torch.log(marginal + 1e-7)).sum(-1))


def diversity_loss(marginal: torch.Tensor) -> torch.Tensor:
    """`(G*V - perplexity) / (G*V)` with perplexity summed over groups: 0 for a uniform marginal, maximal
    (`(G*V - G) / (G*V)`) when every group uses one code."""
    total = marginal.shape[0] * marginal.shape[1]
    return (total - perplexity_per_group(marginal).sum()) / total


class GumbelProductQuantizer(nn.Module):
    """Product quantizer with `groups` codebooks of `entries` vectors each; output is the concatenation of one
    codevector per group, `codevector_dim` wide."""

    def __init__(self, input_dim: int, groups: int, entries: int, codevector_dim: int):
        super().__init__()
        self.groups, self.entries = groups, entries
        self.codevectors = nn.Parameter(torch.empty(1, groups * entries, codevector_dim // groups))
        self.weight_proj = nn.Linear(input_dim, groups * entries)
        self.reset_parameters()

    def reset_parameters(self):
        # as transformers' Wav2Vec2PreTrainedModel._init_weights for the quantizer
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.uniform_(self.codevectors)

    def forward(
        self,
        features: torch.Tensor,
        temperature: torch.Tensor | float = 2.0,
        deterministic: bool | None = None,
        generator: torch.Generator | None = None,
        gumbel_uniform: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` `(batch, frames, input_dim)` -> (codevectors `(batch, frames, codevector_dim)`, soft code
        probabilities `(batch, frames, groups, entries)` for the diversity loss and perplexity).

        In training mode codes are straight-through Gumbel-softmax samples at `temperature`; with
        `deterministic=True` (the default in eval mode) they are the hard arg-max of the logits. `gumbel_uniform`
        `(batch, frames, groups, entries)`: the U(0, 1) draws behind the Gumbel noise (drawn with `generator` if
        None)."""
        batch, frames, _ = features.shape
        deterministic = (not self.training) if deterministic is None else deterministic
        logits = self.weight_proj(features).float().view(batch, frames, self.groups, self.entries)
        soft_probs = logits.softmax(dim=-1)
        index = logits.argmax(dim=-1, keepdim=True)
        hard = torch.zeros_like(logits).scatter_(-1, index, 1.0)
        if deterministic:
            one_hot = hard
        else:
            uniform = (torch.rand(logits.shape, generator=generator, device=logits.device)
                       if gumbel_uniform is None else gumbel_uniform)
            gumbels = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
            y_soft = ((logits + gumbels) / temperature).softmax(dim=-1)
            index = y_soft.argmax(dim=-1, keepdim=True)
            y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
            one_hot = y_hard - y_soft.detach() + y_soft  # straight-through
        one_hot = one_hot.to(self.codevectors.dtype)
        # (B, T, G, V) x (G, V, D/G) -> (B, T, G, D/G)
        codebooks = self.codevectors.view(self.groups, self.entries, -1)
        codes = torch.einsum("btgv,gvd->btgd", one_hot, codebooks)
        return codes.reshape(batch, frames, -1), soft_probs
