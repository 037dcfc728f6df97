"""DIN target attention over the user's click history (part of the Mixer, paper §3.2/§4.1)."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

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

    def _first_layer(self) -> Tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor], nn.Module]:
        """(linear on [q, k, q-k, q*k], its activation, the rest of the scoring stack)."""
        if isinstance(self.attention_mlp, MLP):
            first = self.attention_mlp._mlp[0]
            rest = nn.Sequential(*self.attention_mlp._mlp[1:], self.attention_out)
            return first._linear, first._activation_fn, rest
        return self.attention_out, (lambda x: x), nn.Identity()

    def _scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention logits ``[*lead, N, H]`` for queries ``q [*lead, N, d]`` and ``keys [N, H, d]``.

        The first layer's weight is split by input block, ``W = [W_q W_k W_d W_p]``, so
        ``W [q; k; q-k; q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k)``: the q term is
        computed once per query and the k term once per history slot (shared by every
        query of the row, e.g. the L recall passes), leaving one d -> h product per
        (query, slot) instead of a 4d -> h one. Same function, same parameters.
        """
        linear, act, rest = self._first_layer()
        w_q, w_k, w_d, w_p = linear.weight.split(keys.shape[-1], dim=1)
        q_term = nn.functional.linear(q, w_q + w_d, linear.bias)  # [*lead, N, h]
        k_term = nn.functional.linear(keys, w_k - w_d)  # [N, H, h]
        qk_term = nn.functional.linear(q.unsqueeze(-2) * keys, w_p)  # [*lead, N, H, h]
        hidden = act(qk_term + k_term + q_term.unsqueeze(-2))
        return rest(hidden).squeeze(-1)

    def forward(self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over ``keys [N, H, d]`` with ``mask [N, H]`` (True = real click) -> ``[N, d]``.

        ``target`` may carry leading dims (``[L, N, F_enc*d]``, the L recall passes of the
        same rows); the output then is ``[L, N, d]`` and the history is processed once.
        """
        if keys.shape[1] == 0:
            return keys.new_zeros(*target.shape[:-1], keys.shape[2])
        scores = self._scores(self.query(target), keys)
        scores = scores.masked_fill(~mask, -1e9)
        weights = torch.softmax(scores, dim=-1) * mask.to(scores.dtype)
        return (weights.unsqueeze(-1) * keys).sum(-2)


class HistoryPositionEmbedding(nn.Module):
    """A learned vector per history position (``model.history_position``), added to the DIN keys.

    ``hist_j`` is the user's j-th most recent click, so position j is recency: with it in the key,
    the target attention can weigh the last clicks more than older ones (DIN's keys are otherwise
    order-free; SASRec/BST-style models get the order from position embeddings). Zero at
    initialisation, so the model starts as the order-free one and learns recency from the loss.

    Args:
        history_length: H (``data.history_length``).
        dim: d.
        device: parameter device ("meta" allowed; DMP calls :meth:`reset_parameters`).
    """

    def __init__(self, history_length: int, dim: int, device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(history_length, dim, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys [N, H, d]`` + the position vectors (broadcast over rows)."""
        return keys + self.weight
