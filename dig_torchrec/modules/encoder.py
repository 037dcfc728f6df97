"""VQ encoder (paper §3.2, Eq. 1): a small Transformer over an item's static-field embeddings.

e_v = Enc(x_v^s) keeps the per-field layout ``[N, F_enc, d]`` so that the SID embedding
prefix e_sid^(1:l) (same shape) can replace it in the Mixer (Eq. 6 vs Eq. 7).

Hand-written attention instead of ``nn.TransformerEncoderLayer``: ``nn.MultiheadAttention``
initialises its packed in-projection in a private ``_reset_parameters``, which DMP's
meta-device materialisation (it calls the public ``reset_parameters``) would skip, leaving
uninitialised memory. Every module here is an ``nn.Linear``/``nn.LayerNorm`` or has its
own ``reset_parameters``, so DMP re-initialises all of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _EncoderBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 2, device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.norm_ffn = nn.LayerNorm(dim, device=device)
        self.ffn_in = nn.Linear(dim, ffn_mult * dim, device=device)
        self.ffn_out = nn.Linear(ffn_mult * dim, dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, f, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(n, f, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [n, heads, f, d/heads]
        x = x + self.out(attn.transpose(1, 2).reshape(n, f, d))
        return x + self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(x))))


class ItemEncoder(nn.Module):
    """Eq. 1: e_v = Enc(x_v^s) over the F_enc item static fields.

    Args:
        num_fields: F_enc (item fields fed to the encoder; item_id first when included).
        dim: d, the embedding dimension of every field.
        num_layers: Transformer blocks (``tokenizer.encoder_layers``; 0 = field embedding + LayerNorm).
        heads: attention heads (must divide ``dim``).
        device: parameter device ("meta" allowed).
    """

    def __init__(
        self, num_fields: int, dim: int, num_layers: int, heads: int, device: Optional[torch.device | str] = None
    ) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.dim = dim
        # which field a token is; small init so it does not drown the field embeddings
        self.field_embedding = nn.Parameter(torch.empty(num_fields, dim, device=device))
        self.reset_parameters()
        self.blocks = nn.ModuleList([_EncoderBlock(dim, heads, device=device) for _ in range(num_layers)])
        # no affine: a learnable gain could shrink to 0 and collapse every e_v onto one code
        # (the cheapest way to zero L_commit and L_sem), see the README
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, device=device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.field_embedding, std=0.02)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """``[N, F_enc, d]`` field embeddings -> e_v ``[N, F_enc, d]``."""
        x = fields + self.field_embedding[None]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
