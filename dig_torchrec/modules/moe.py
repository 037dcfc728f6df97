"""Mixture of gated experts (the MoE of the DIN+DCNv2+MoE ranker, paper §4.1)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class MixtureOfExperts(nn.Module):
    """y = sum_e softmax(W_g x)_e * Expert_e(x), each expert a torchrec ``MLP``.

    Args:
        in_features: input width.
        hidden: expert layer sizes (``model.expert_hidden``); output width is ``hidden[-1]``.
        num_experts: E.
        dropout: dropout on the mixed output.
        device: parameter device ("meta" allowed).
    """

    def __init__(
        self, in_features: int, hidden: List[int], num_experts: int, dropout: float = 0.0,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [MLP(in_features, list(hidden), activation="relu", device=device) for _ in range(num_experts)]
        )
        self.gate = nn.Linear(in_features, num_experts, device=device)
        self.dropout = nn.Dropout(dropout)
        self.out_features = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(self.gate(x), dim=-1)  # [N, E]
        experts = torch.stack([expert(x) for expert in self.experts], 1)  # [N, E, h]
        return self.dropout((gates[..., None] * experts).sum(1))
