import pytest
import torch

from qformer_lightning.nn import masks
from qformer_lightning.nn.qformer import QFormer

B, Q, T, N, DV = 2, 4, 6, 5, 24


def _qformer(**kw) -> QFormer:
    torch.manual_seed(0)
    args = dict(
        num_layers=3, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=Q,
        cross_attention_freq=2, vision_width=DV, vocab_size=50, max_position_embeddings=16,
    )
    args.update(kw)
    return QFormer(**args).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(B, N, DV, generator=g)
    ids = torch.randint(1, 50, (B, T), generator=g)
    text_mask = torch.ones(B, T, dtype=torch.long)
    text_mask[1, 4:] = 0
    return image, ids, text_mask


def test_cross_attention_layout() -> None:
    q = _qformer(num_layers=5, cross_attention_freq=2)
    assert [layer.cross_attn is not None for layer in q.layers] == [True, False, True, False, True]
    q1 = _qformer(num_layers=3, cross_attention_freq=1)
    assert all(layer.cross_attn is not None for layer in q1.layers)
    assert q1.layers[0].cross_attn.kv_proj.in_features == DV


def test_cached_text_pass_equals_joint_causal_pass() -> None:
    """ITG: the text pass over the query cache equals one joint pass with the causal mask."""
    q = _qformer()
    image, ids, text_mask = _inputs()
    cached = q.encode_queries(image, use_cache=True)
    text_out = q.decode_text(ids, text_mask, cached.cache)
    joint = q(q.embed(ids), Q, mask=masks.multimodal_causal_mask(Q, text_mask), image_embeds=image).hidden
    valid = text_mask.bool()
    torch.testing.assert_close(text_out[valid], joint[:, Q:][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.hidden, joint[:, :Q], atol=1e-5, rtol=1e-5)


def test_unimodal_joint_pass_equals_separate_passes() -> None:
    """ITC: queries and text under the unimodal mask do not influence each other."""
    q = _qformer()
    image, ids, text_mask = _inputs()
    joint = q(q.embed(ids), Q, mask=masks.unimodal_mask(Q, text_mask), image_embeds=image).hidden
    torch.testing.assert_close(joint[:, :Q], q.encode_queries(image).hidden, atol=1e-5, rtol=1e-5)
    valid = text_mask.bool()
    torch.testing.assert_close(joint[:, Q:][valid], q.encode_text(ids, text_mask)[valid], atol=1e-5, rtol=1e-5)


def test_text_changes_queries_only_in_bidirectional_regime() -> None:
    q = _qformer()
    image, ids, text_mask = _inputs()
    other = ids.clone()
    other[:, 1] = (other[:, 1] % 49) + 1
    a = q.encode_joint(image, ids, text_mask)[:, :Q]
    b = q.encode_joint(image, other, text_mask)[:, :Q]
    assert (a - b).abs().max() > 1e-4
    # causal regime: queries never see text
    ca = q(q.embed(ids), Q, mask=masks.multimodal_causal_mask(Q, text_mask), image_embeds=image).hidden[:, :Q]
    cb = q(q.embed(other), Q, mask=masks.multimodal_causal_mask(Q, text_mask), image_embeds=image).hidden[:, :Q]
    torch.testing.assert_close(ca, cb)


def test_padding_does_not_leak() -> None:
    q = _qformer()
    image, ids, text_mask = _inputs()
    changed = ids.clone()
    changed[1, 4:] = 7  # padding positions of sample 1
    a = q.encode_text(ids, text_mask)[1, :4]
    b = q.encode_text(changed, text_mask)[1, :4]
    torch.testing.assert_close(a, b)


def test_query_output_shape_independent_of_image_tokens() -> None:
    q = _qformer()
    for n in (5, 17):
        out = q.encode_queries(torch.randn(B, n, DV)).hidden
        assert out.shape == (B, Q, 32)


def test_stage2_qformer_has_no_text_parts() -> None:
    q = _qformer(text_ffn=False)
    assert q.word_embeddings is None and all(layer.text_ffn is None for layer in q.layers)
    image, ids, text_mask = _inputs()
    assert q.encode_queries(image).hidden.shape == (B, Q, 32)
    with pytest.raises(ValueError, match="no text embeddings"):
        q.encode_text(ids, text_mask)


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        QFormer(num_layers=1, hidden_size=30, num_heads=4, intermediate_size=8, vision_width=8)
    with pytest.raises(ValueError, match="cross_attention_freq"):
        QFormer(num_layers=1, hidden_size=32, num_heads=4, intermediate_size=8, vision_width=8, cross_attention_freq=0)
    q = _qformer()
    with pytest.raises(ValueError, match="vision_width"):
        q.encode_queries(torch.randn(B, N, DV + 1))


def test_init_statistics() -> None:
    q = _qformer(hidden_size=64, num_heads=4, initializer_range=0.02)
    assert abs(q.query_tokens.std().item() - 0.02) < 0.005
    assert torch.all(q.layers[0].self_attn.qkv_proj.bias == 0)
    assert torch.all(q.embed_norm.weight == 1)
