"""DIN target attention over the user's click history (part of the Mixer, paper §3.2/§4.1)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class TargetAttention(nn.Module):
    """DIN: attention weights a(q, k_j) = MLP([q, k_j, q - k_j, q * k_j]) over the history.

    The target (e_v on the rank path, e_sid^(1:l) on the recall path, both ``[N, F_enc*d]``
    after their BN) is projected to the key dimension d to form the query q. Empty history
    positions (bag length 0) are masked out; a user with no history gets a zero vector.

    Args:
        target_dim: F_enc * d.
        key_dim: d (history keys are item_id embeddings).
        hidden: attention MLP sizes (``model.din_hidden``).
        device: parameter device ("meta" allowed).
    """

    def __init__(self, target_dim: int, key_dim: int, hidden: List[int], device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        self.query = nn.Linear(target_dim, key_dim, device=device)
        self.attention_mlp = MLP(4 * key_dim, list(hidden), activation="relu", device=device) if hidden else nn.Identity()
        self.attention_out = nn.Linear(hidden[-1] if hidden else 4 * key_dim, 1, device=device)

    def forward(self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over ``keys [N, H, d]`` with ``mask [N, H]`` (True = real click) -> ``[N, d]``."""
        if keys.shape[1] == 0:
            return keys.new_zeros(keys.shape[0], keys.shape[2])
        q = self.query(target)[:, None, :].expand_as(keys)
        scores = self.attention_out(self.attention_mlp(torch.cat([q, keys, q - keys, q * keys], -1))).squeeze(-1)
        scores = scores.masked_fill(~mask, -1e9)
        weights = torch.softmax(scores, dim=1) * mask.to(scores.dtype)
        return (weights[..., None] * keys).sum(1)
