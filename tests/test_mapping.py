import pytest
import torch

from models.mapping import MLP, TransformerMapper


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_transformer_mapper_parameter_count_matches_original():
    assert count(TransformerMapper(576, 768, 40, 40, 8)) == 55_554_048


def test_mlp_parameter_count_and_layout():
    mlp = MLP((576, 3840, 7680))
    assert count(mlp) == 576 * 3840 + 3840 + 3840 * 7680 + 7680
    assert [type(m).__name__ for m in mlp.model] == ["Linear", "Tanh", "Linear"]


def test_transformer_mapper_pooled_and_grid_shapes():
    torch.manual_seed(0)
    pooled = TransformerMapper(16, 32, prefix_length=5, clip_length=3, num_layers=2)
    out = pooled(torch.randn(4, 16))
    assert out.shape == (4, 5, 32) and torch.isfinite(out).all()
    grid = TransformerMapper(16, 32, prefix_length=5, clip_length=3, num_layers=2, grid_tokens=9)
    out = grid(torch.randn(4, 9, 16))
    assert out.shape == (4, 5, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert grid.pos_embed.grad is not None and grid.token_proj.weight.grad.abs().sum() > 0


def test_transformer_mapper_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expects \(B, D\)"):
        TransformerMapper(16, 32, 5, 3, 1)(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match=r"expects \(B, 9, D\)"):
        TransformerMapper(16, 32, 5, 3, 1, grid_tokens=9)(torch.randn(2, 4, 16))


def test_attention_equals_original_einsum_formulation():
    torch.manual_seed(0)
    attn = TransformerMapper(8, 16, 2, 2, 1).transformer.layers[0].attn
    x = torch.randn(3, 4, 16)
    b, n, c, h = 3, 4, 16, attn.num_heads
    q = attn.to_queries(x).reshape(b, n, h, c // h)
    kv = attn.to_keys_values(x).reshape(b, n, 2, h, c // h)
    a = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // h) ** -0.5
    ref = attn.project(torch.einsum("bnmh,bmhd->bnhd", a.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-5)
