import pytest
import timm
import torch
from safetensors.torch import save_file

from qformer_lightning.encoders.vision import TimmVisionEncoder, load_timm_checkpoint

TINY = dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0)


def test_second_last_block_no_final_norm_then_ln_vision() -> None:
    torch.manual_seed(0)
    enc = TimmVisionEncoder(image_size=28, model_kwargs=TINY)
    assert len(enc.vit.blocks) == 2 and isinstance(enc.vit.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 28, 28)
    out = enc(x)
    assert out.shape == (2, enc.num_tokens, 16) and enc.num_tokens == 5
    # the output is ln_vision of the second block's output
    vit = enc.vit
    h, rope = vit._pos_embed(vit.patch_embed(x))  # timm Eva returns (tokens, rope)
    assert rope is None
    for block in vit.blocks:
        h = block(h)
    torch.testing.assert_close(out, enc.ln_vision(h))


def test_frozen_encoder_has_no_grad_and_stays_eval() -> None:
    enc = TimmVisionEncoder(image_size=28, model_kwargs=TINY)
    enc.train()
    assert not enc.vit.training and enc.ln_vision.training
    assert not any(p.requires_grad for p in enc.vit.parameters())
    out = enc(torch.randn(1, 3, 28, 28))
    out.sum().backward()
    assert enc.ln_vision.weight.grad is not None


def test_position_embedding_interpolation_from_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    small = TimmVisionEncoder(image_size=28, num_removed_blocks=0, model_kwargs=TINY)
    path = tmp_path / "vit.pth"
    torch.save(small.vit.state_dict(), path)
    big = TimmVisionEncoder(image_size=42, checkpoint_path=str(path), num_removed_blocks=0, model_kwargs=TINY)
    big.load_weights()
    assert big.vit.pos_embed.shape == (1, 1 + 9, 16) and big.num_tokens == 10
    torch.testing.assert_close(big.vit.pos_embed[:, 0], small.vit.pos_embed[:, 0])  # class token kept
    torch.testing.assert_close(big.vit.blocks[0].mlp.fc1.weight, small.vit.blocks[0].mlp.fc1.weight)
    assert big(torch.randn(1, 3, 42, 42)).shape == (1, 10, 16)


def test_full_vit_file_loads_into_the_cut_encoder(tmp_path) -> None:
    """A whole timm ViT (all blocks, final norm: what EVA-CLIP or the demo's pretraining saves) loads
    into the encoder that keeps all but its last block; features equal the full ViT's second-last block."""
    torch.manual_seed(0)
    full = timm.create_model("eva_giant_patch14_clip_224", num_classes=0, img_size=28, **TINY)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    enc = TimmVisionEncoder(image_size=28, checkpoint_path=str(path), num_removed_blocks=1, model_kwargs=TINY)
    enc.load_weights()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        x, _ = full._pos_embed(full.patch_embed(images))  # timm Eva returns (tokens, rope)
        for block in full.blocks[:-1]:
            x = block(x)
        torch.testing.assert_close(enc.forward_vit(images), x)
    wrong = dict(TINY, embed_dim=TINY["embed_dim"] * 2)
    with pytest.raises(ValueError, match="does not fit"):
        TimmVisionEncoder(image_size=28, checkpoint_path=str(path), model_kwargs=wrong).load_weights()


def test_bad_inputs_give_clear_errors(tmp_path) -> None:
    enc = TimmVisionEncoder(image_size=28, model_kwargs=TINY)
    with pytest.raises(ValueError, match="built for 28x28"):
        enc(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match="must be a multiple of its patch size"):
        TimmVisionEncoder(image_size=30, model_kwargs=TINY)
    missing = TimmVisionEncoder(image_size=28, checkpoint_path=str(tmp_path / "missing.pth"), model_kwargs=TINY)
    with pytest.raises(FileNotFoundError, match="vision checkpoint not found.*checkpoint_path"):
        missing.load_weights()  # the file is read when the task sets the model up, not when the config is parsed
    with pytest.raises(FileNotFoundError, match="vision checkpoint not found"):
        missing(torch.randn(1, 3, 28, 28))  # never runs with random weights instead
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_timm_checkpoint(enc.vit, tmp_path / "bad.pth")


def test_gradient_checkpointing_matches() -> None:
    torch.manual_seed(0)
    a = TimmVisionEncoder(image_size=28, frozen=False, model_kwargs=TINY)
    b = TimmVisionEncoder(image_size=28, frozen=False, grad_checkpointing=True, model_kwargs=TINY)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 28, 28)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    torch.testing.assert_close(a.vit.blocks[0].attn.qkv.weight.grad, b.vit.blocks[0].attn.qkv.weight.grad)
