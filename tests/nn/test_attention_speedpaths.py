"""The faster computation orders of the attention module give the results of the plain ones.

- cross-attention "absorbed" order (q W_k) X^T / (P X) W_v^T against projecting keys/values, with
  and without dropout (same random draws), values and gradients;
- the whole query pass against transformers' Blip2QFormerModel with the same weights, in a size
  where the absorbed order is chosen;
- the fused residual dropout and its mask distribution.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qformer_lightning.convert.hf import load_hf_state_dict
from qformer_lightning.nn.attention import MultiHeadAttention, add_dropped, dropout_mask
from qformer_lightning.nn.qformer import QFormer

B, L, S, D, H, DK = 2, 4, 20, 32, 2, 24


def _cross(attention_dropout: float = 0.0, hidden_dropout: float = 0.0) -> MultiHeadAttention:
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, kv_width=DK, attention_dropout=attention_dropout, hidden_dropout=hidden_dropout)
    for p in attn.parameters():  # non-trivial biases and norms too
        nn.init.normal_(p, std=0.3)
    return attn


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, D, generator=g, requires_grad=True), torch.randn(B, S, DK, generator=g)


def test_cost_model_picks_absorbed_order_for_blip2_sizes() -> None:
    blip2 = MultiHeadAttention(768, 12, kv_width=1408)
    assert blip2._absorbed_is_cheaper(32, 257, 1408)  # 32 queries, ViT-g at 224 px
    assert blip2._absorbed_is_cheaper(32, 677, 1408)  # 364 px
    assert not blip2._absorbed_is_cheaper(256, 257, 1408)  # H L = 3072 > D: project keys/values
    assert _cross()._absorbed_is_cheaper(L, S, DK)


def test_cross_attend_equals_forward_values_and_gradients() -> None:
    attn = _cross().eval()
    hidden, image = _inputs()
    fast = attn.cross_attend(hidden, image)
    grads_fast = torch.autograd.grad((fast * torch.linspace(-1, 1, D)).sum(), [hidden, *attn.parameters()])
    plain, (k, v) = attn(hidden, kv_source=image)
    grads_plain = torch.autograd.grad((plain * torch.linspace(-1, 1, D)).sum(), [hidden, *attn.parameters()])
    assert k.shape == v.shape == (B, H, S, D // H)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["hidden", *dict(attn.named_parameters())], grads_fast, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_cross_attend_with_dropout_matches_plain_computation_with_same_draws() -> None:
    """Train mode: the absorbed order with probability dropout (rowsum(P) b_v term) equals the plain
    attention using the same masks (drawn in the same order from the same seed)."""
    p_attn, p_hidden = 0.3, 0.2
    attn = _cross(p_attn, p_hidden).train()
    hidden, image = _inputs()
    torch.manual_seed(5)
    fast = attn.cross_attend(hidden, image)

    torch.manual_seed(5)
    probs_mask = dropout_mask(torch.empty(B, H * L, S), p_attn).view(B, H, L, S)
    hidden_mask = dropout_mask(torch.empty(B, L, D), p_hidden)
    q = attn.q_proj(hidden).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
    k, v = attn.kv_proj(image).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh) each
    probs = (q @ k.transpose(-1, -2) / (D // H) ** 0.5).softmax(-1) * probs_mask
    context = (probs @ v).transpose(1, 2).reshape(B, L, D)
    expected = attn.norm(hidden + attn.out_proj(context) * hidden_mask)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, attn.eval().cross_attend(hidden, image), atol=1e-3)  # dropout did act


def test_self_attention_train_path_matches_sdpa_with_same_draws() -> None:
    """CPU train mode without a mask uses a plain softmax path; same result as SDPA's arithmetic."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, attention_dropout=0.25, hidden_dropout=0.0).train()
    hidden, _ = _inputs()
    torch.manual_seed(7)
    out, (k, v) = attn(hidden)
    torch.manual_seed(7)
    mask = dropout_mask(torch.empty(B, H, L, L), 0.25)
    q, k2, v2 = attn.qkv_proj(hidden).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    context = ((q @ k2.transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1) * mask @ v2
    expected = attn.norm(hidden + attn.out_proj(context.transpose(1, 2).reshape(B, L, D)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k2)
    # eval: SDPA, no dropout
    attn.eval()
    plain = F.scaled_dot_product_attention(q, k2, v2).transpose(1, 2).reshape(B, L, D)
    torch.testing.assert_close(attn(hidden)[0], attn.norm(hidden + attn.out_proj(plain)), atol=1e-5, rtol=1e-5)


def test_dropout_mask_distribution_and_fused_residual() -> None:
    torch.manual_seed(0)
    mask = dropout_mask(torch.empty(200_000), 0.1)
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / 0.9])
    assert abs((mask == 0).float().mean().item() - 0.1) < 0.005
    assert abs(mask.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation

    residual, update = torch.randn(3, 5), torch.randn(3, 5)
    drop = nn.Dropout(0.5).eval()
    assert torch.equal(add_dropped(residual, update, drop), residual + update)
    drop.train()
    torch.manual_seed(3)
    out = add_dropped(residual, update, drop)
    torch.manual_seed(3)
    assert torch.allclose(out, residual + update * dropout_mask(update, 0.5))
    assert torch.equal(add_dropped(residual, update, nn.Dropout(1.0).train()), residual)


def _hf_reference(size: dict):
    """transformers' Q-Former (queries only) with random non-trivial weights, biases and norms."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Blip2QFormerConfig(
        hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_heads"],
        intermediate_size=size["intermediate_size"],
        cross_attention_frequency=2,
        encoder_hidden_size=size["vision_width"],
        use_qformer_text_input=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    ref = transformers.Blip2QFormerModel(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.mark.parametrize("image_tokens", [3, 40])  # 3: keys/values projected; 40: absorbed order
def test_query_pass_matches_transformers_blip2_qformer(image_tokens: int) -> None:
    size = dict(num_layers=3, hidden_size=32, num_heads=2, intermediate_size=48, vision_width=24)
    ref = _hf_reference(size)
    ours = QFormer(**size, num_query_tokens=4, text_ffn=False).eval()
    load_hf_state_dict(ours, ref.state_dict(), strict=True)  # the converter's fused q/k/v and k/v rules
    absorbed = ours.layers[0].cross_attn._absorbed_is_cheaper(4, image_tokens, size["vision_width"])
    assert absorbed == (image_tokens == 40)
    image = torch.randn(2, image_tokens, size["vision_width"], generator=torch.Generator().manual_seed(2))
    out = ours.encode_queries(image).hidden
    expected = ref(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
