"""Mapping networks: one image feature (or a grid of them) -> `prefix_length` decoder input embeddings.

Module and parameter names follow the original ClipCap code exactly, so its state dicts load strictly.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with Tanh between them: `MLP((in, hidden, out))`, as the original."""

    def __init__(self, sizes: Sequence[int], bias: bool = True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim: int, h_dim: int, out_d: Optional[int] = None, act=F.relu, dropout: float = 0.0):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.fc1(x)))
        return self.dropout(self.fc2(x))


class MultiHeadAttention(nn.Module):
    """The original attention, computed with `scaled_dot_product_attention` instead of two einsums
    (same result, fused kernels, no (B, N, M, H) attention tensor kept for backward)."""

    def __init__(self, dim_self: int, dim_ref: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x if y is None else y
        b, n, c = x.shape
        m = y.shape[1]
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (B, H, N, C/H)
        kv = self.to_keys_values(y).view(b, m, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, M, C/H)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class TransformerLayer(nn.Module):
    def __init__(self, dim_self: int, dim_ref: int, num_heads: int, mlp_ratio: float = 4.0, bias: bool = False,
                 dropout: float = 0.0, act=F.relu, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = norm_layer(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act, dropout=dropout)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim_self: int, num_heads: int, num_layers: int, dim_ref: Optional[int] = None,
                 mlp_ratio: float = 2.0, act=F.relu, norm_layer=nn.LayerNorm):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        self.layers = nn.ModuleList(
            TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio, act=act, norm_layer=norm_layer)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """`clip_length` tokens projected from the image feature, followed by `prefix_length` learned constants,
    through a transformer (8 heads, MLP ratio 2); the outputs at the constants' positions are the prefix.

    With `grid_tokens` set, the input is a grid of features (B, T, D): each token is projected to the
    decoder width and given a learned position embedding, and takes the place of the `clip_length` tokens.
    """

    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int,
                 num_layers: int = 8, grid_tokens: Optional[int] = None):
        super().__init__()
        self.clip_length = clip_length
        self.grid_tokens = grid_tokens
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        if grid_tokens is None:
            self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        else:
            self.token_proj = nn.Linear(dim_clip, dim_embedding)
            self.pos_embed = nn.Parameter(torch.randn(grid_tokens, dim_embedding) * 0.02)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid_tokens is None:
            if x.ndim != 2:
                raise ValueError(f"TransformerMapper built for pooled features expects (B, D), got {tuple(x.shape)}")
            x = self.linear(x).view(x.shape[0], self.clip_length, -1)  # (B, clip_length, C)
        else:
            if x.ndim != 3 or x.shape[1] != self.grid_tokens:
                raise ValueError(
                    f"TransformerMapper built for {self.grid_tokens} grid tokens expects (B, {self.grid_tokens}, D), "
                    f"got {tuple(x.shape)}")
            x = self.token_proj(x) + self.pos_embed  # (B, T, C)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        out = self.transformer(torch.cat((x, prefix), dim=1))
        return out[:, x.shape[1]:]  # (B, prefix_length, C)
