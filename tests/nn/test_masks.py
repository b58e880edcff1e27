import torch

from qformer_lightning.nn import masks


def _text_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_unimodal_blocks() -> None:
    m = masks.unimodal_mask(2, _text_mask())
    assert m.shape == (2, 5, 5)
    # queries see queries only
    assert m[0, :2, :2].all() and not m[0, :2, 2:].any()
    # text sees text only, never padding
    assert not m[0, 2:, :2].any() and m[0, 2:, 2:].all()
    assert m[1, 2:, 2:4].all() and not m[1, 2:, 4].any()


def test_bidirectional_sees_all_real_tokens() -> None:
    m = masks.bidirectional_mask(2, _text_mask())
    expected_row = torch.tensor([True, True, True, True, False])
    assert torch.equal(m[1], expected_row.expand(5, 5))
    assert m[0].all()


def test_multimodal_causal_exact() -> None:
    m = masks.multimodal_causal_mask(2, _text_mask())
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # query 0
            [1, 1, 0, 0, 0],  # query 1
            [1, 1, 1, 0, 0],  # text 0 ([DEC])
            [1, 1, 1, 1, 0],  # text 1
            [1, 1, 1, 1, 1],  # text 2
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[0], expected)
    # padding key (last text token of sample 1) is never attended
    assert not m[1, :, 4].any()
    assert torch.equal(masks.causal_text_rows(2, _text_mask()), m[:, 2:])


def test_no_row_fully_masked() -> None:
    tm = torch.tensor([[1, 0, 0, 0]])
    for fn in (masks.unimodal_mask, masks.bidirectional_mask, masks.multimodal_causal_mask):
        assert fn(3, tm).any(dim=-1).all()
    assert masks.padding_mask(tm).any(dim=-1).all()
