"""The shared Mixer (paper §3.2): every module that touches the target representation.

Both paths call the same Mixer; only what they feed it differs (Eq. 6 vs Eq. 7):

* rank path:   [BN_u(e_u); BN_v(e_v);               BN_u2i(c_uv)]
* recall path: [BN_u(e_u); BN_sid(e_sid^(1:l));     BN_u2t(u2t^(1:l))]

Inside: DIN target attention over the history (query = the target slot), a DCNv2 cross
network (``torchrec.modules.crossnet``) over the concatenation, an MoE of gated experts
and a linear head producing one logit.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from dig_torchrec.config import ModelConfig
from dig_torchrec.modules.din import TargetAttention
from dig_torchrec.modules.moe import MixtureOfExperts


class _ResettableParameterList(nn.ParameterList):
    """A ``ParameterList`` with ``reset_parameters`` so DMP can initialise it from ``meta``.

    torchrec's cross nets initialise their ``ParameterList``s in ``__init__`` only; DMP
    materialises meta parameters as uninitialised memory and calls ``reset_parameters``
    on the module that owns them, which a plain ``ParameterList`` lacks.
    """

    init_fn: Callable[[torch.Tensor], torch.Tensor]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in self:
            type(self).init_fn(p)


class _XavierList(_ResettableParameterList):
    init_fn = staticmethod(nn.init.xavier_normal_)


class _ZeroList(_ResettableParameterList):
    init_fn = staticmethod(nn.init.zeros_)


def _make_resettable(plist: nn.ParameterList, cls: type) -> nn.ParameterList:
    out = cls()
    for p in plist:
        out.append(p)
    return out


def build_cross_net(in_features: int, num_layers: int, low_rank: int, device: Optional[torch.device | str]) -> nn.Module:
    """DCNv2 cross network: ``CrossNet`` (full rank) or ``LowRankCrossNet`` (``low_rank > 0``)."""
    with torch.device(device if device is not None else "cpu"):
        if low_rank > 0:
            net = LowRankCrossNet(in_features, num_layers, low_rank=low_rank)
            net.W_kernels = _make_resettable(net.W_kernels, _XavierList)
            net.V_kernels = _make_resettable(net.V_kernels, _XavierList)
        else:
            net = CrossNet(in_features, num_layers)
            net.kernels = _make_resettable(net.kernels, _XavierList)
        net.bias = _make_resettable(net.bias, _ZeroList)
    return net


class Mixer(nn.Module):
    """DIN + DCNv2 + MoE + head, shared by the rank and recall paths.

    Args:
        user_dim: width of BN_u(e_u) (F_u * d).
        target_dim: width of the target slot (F_enc * d): BN_v(e_v) or BN_sid(e_sid).
        cross_feature_dim: d_c, width of BN_u2i(c_uv) or BN_u2t(u2t).
        key_dim: d, width of a history key.
        cfg: model config (DIN hidden sizes, cross layers/rank, experts, dropout).
        device: parameter device ("meta" allowed).
    """

    def __init__(
        self, user_dim: int, target_dim: int, cross_feature_dim: int, key_dim: int, cfg: ModelConfig,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        self.din = TargetAttention(target_dim, key_dim, cfg.din_hidden, device=device)
        in_features = user_dim + target_dim + cross_feature_dim + key_dim
        self.in_features = in_features
        self.cross = build_cross_net(in_features, cfg.cross_layers, cfg.cross_low_rank, device)
        self.moe = MixtureOfExperts(in_features, cfg.expert_hidden, cfg.num_experts, cfg.dropout, device=device)
        self.head = nn.Linear(self.moe.out_features, 1, device=device)
        self.autocast_dtype: Optional[torch.dtype] = None  # set by train.precision (training/precision.py)

    def forward(
        self, user: torch.Tensor, target: torch.Tensor, cross_features: torch.Tensor,
        history_keys: torch.Tensor, history_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[N]`` from normalised inputs, or ``[L, N]`` for L passes over the same rows.

        ``target`` and ``cross_features`` may carry a leading L (the recall path's L prefix
        depths, Eq. 7): the result equals the per-row call on the passes stacked along the
        batch, but the user and history are shared and DIN projects the history once.

        Args:
            user: ``[N, F_u*d]`` BN_u(e_u).
            target: ``[(L,) N, F_enc*d]`` BN_v(e_v) or BN_sid(e_sid^(1:l)).
            cross_features: ``[(L,) N, d_c]`` BN_u2i(c_uv) or BN_u2t(u2t^(1:l)).
            history_keys: ``[N, H, d]`` history item embeddings (DIN keys).
            history_mask: ``[N, H]`` True where the history position holds a click.
        """
        if self.autocast_dtype is None:
            return self._mix(user, target, cross_features, history_keys, history_mask)
        # train.precision=bf16: the Mixer's matmuls in bf16; logits (and so every loss) back in fp32
        with torch.autocast(device_type=user.device.type, dtype=self.autocast_dtype):
            logits = self._mix(user, target, cross_features, history_keys, history_mask)
        return logits.float()

    def _mix(
        self, user: torch.Tensor, target: torch.Tensor, cross_features: torch.Tensor,
        history_keys: torch.Tensor, history_mask: torch.Tensor,
    ) -> torch.Tensor:
        interest = self.din(target, history_keys, history_mask)
        lead = target.shape[:-1]
        x = torch.cat([user.expand(*lead, -1), target, cross_features, interest], -1)
        return self.head(self.moe(self.cross(x.reshape(-1, x.shape[-1])))).view(lead)
