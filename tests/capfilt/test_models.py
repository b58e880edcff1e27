"""Captioner sampling (shape, seed determinism, prompt removed) and CLIP scores against CLIPModel's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qformer_lightning.capfilt import Captioner, ClipScorer, SamplingConfig
from qformer_lightning.capfilt.batches import ImagePreprocessor, decode_image

from capfilt_tiny import IMAGE, TINY_SAMPLING


def images(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (IMAGE + 5, IMAGE, 3), dtype=np.uint8)) for i in range(n)]


def test_captioner_samples_n_captions_per_image_deterministically(captioner_dir: str) -> None:
    from transformers import AutoImageProcessor

    captioner = Captioner.from_pretrained(captioner_dir, TINY_SAMPLING)
    pixels = AutoImageProcessor.from_pretrained(captioner_dir)(images=images(3), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, IMAGE, IMAGE)
    state = torch.random.get_rng_state()
    first = captioner.generate(pixels, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert [len(c) for c in first] == [3, 3, 3]
    assert captioner.generate(pixels, seed=11) == first
    other = captioner.generate(pixels, seed=12)
    assert other != first
    flat = [c for caps in first + other for c in caps]
    assert all(not c.lower().startswith("a picture of") for c in flat)
    assert len(set(flat)) > 3  # sampling, not greedy: random weights give different texts
    assert captioner.generate(pixels[:0], seed=1) == []


def test_captioner_tokens_follow_prompt(captioner_dir: str) -> None:
    """Without stripping, every sampled sequence starts with the prompt (the model continues it)."""
    from transformers import AutoImageProcessor

    raw = Captioner.from_pretrained(captioner_dir, SamplingConfig(num_captions=2, max_length=10, min_length=6, prompt="a picture of "))
    pixels = AutoImageProcessor.from_pretrained(captioner_dir)(images=images(2), return_tensors="pt")["pixel_values"]
    enc = raw.tokenizer(["a picture of "] * 2, return_tensors="pt")
    torch.manual_seed(0)
    out = raw.model.generate(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             do_sample=True, num_return_sequences=2, max_length=10, min_length=6)
    assert out.shape[0] == 4 and out.shape[1] <= 10
    assert (out[:, 1:4] == torch.tensor(raw.tokenizer.convert_tokens_to_ids(["a", "picture", "of"]))).all()
    assert (out[:, 0] == raw.tokenizer.bos_token_id).all()  # [DEC], as BLIP


def test_clip_scores_match_clipmodel_logits(clip_dir: str) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    scorer = ClipScorer.from_pretrained(clip_dir)
    assert scorer.max_text_length == 77
    pixels = AutoImageProcessor.from_pretrained(clip_dir)(images=images(2), return_tensors="pt")["pixel_values"]
    texts = [["a red circle", "two blue squares", "a dog"], ["a green triangle at the top"]]
    scores = scorer.score(pixels, texts)
    assert [len(s) for s in scores] == [3, 1]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    flat = [t for group in texts for t in group]
    enc = AutoTokenizer.from_pretrained(clip_dir)(flat, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    cosine = out.logits_per_image / model.logit_scale.exp()  # (2, 4)
    expected = [cosine[0, :3].tolist(), cosine[1, 3:].tolist()]
    for got, want in zip(scores, expected):
        assert np.allclose(got, want, atol=1e-5)
    assert len(set(scores[0])) == 3  # the candidates are told apart
    assert scorer.score(pixels, [[], []]) == [[], []]


def test_preprocessor_and_decode(captioner_dir: str, clip_dir: str) -> None:
    import io

    from transformers import AutoImageProcessor

    pre = ImagePreprocessor(AutoImageProcessor.from_pretrained(captioner_dir), AutoImageProcessor.from_pretrained(clip_dir))
    cap, clip = pre(images(2))
    assert cap.shape == (2, 3, IMAGE, IMAGE) and clip.shape == (2, 3, IMAGE, IMAGE)
    buf = io.BytesIO()
    Image.new("RGBA", (9, 7), (10, 20, 30, 0)).save(buf, format="PNG")
    img = decode_image({"png": buf.getvalue()}, 10**6)
    assert img.mode == "RGB" and img.size == (9, 7) and img.getpixel((0, 0)) == (255, 255, 255)
    for members, reason in [({"jpg": b"not an image"}, "UnidentifiedImageError"), ({"txt": b"x"}, "no image member"),
                            ({"png": buf.getvalue()}, "exceeds max_image_pixels")]:
        try:
            decode_image(members, 50)
        except ValueError as err:
            assert reason in str(err)
        else:
            raise AssertionError(f"{members} decoded")


def test_any_image_to_text_model_vision_encoder_decoder(tmp_path) -> None:
    """A VisionEncoderDecoder captioner (no prompt) loads through the same path and samples N captions."""
    from transformers import BertConfig, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    from capfilt_tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=IMAGE, patch_size=8)
    decoder = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id = tok.cls_token_id, tok.pad_token_id
        config.eos_token_id = tok.sep_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(tmp_path)
    captioner = Captioner.from_pretrained(str(tmp_path), SamplingConfig(num_captions=2, max_length=8, min_length=3, prompt=""))
    assert type(captioner.model).__name__ == "VisionEncoderDecoderModel"
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    captions = captioner.generate(pixels, seed=0)
    assert [len(c) for c in captions] == [2, 2, 2] and all(c for caps in captions for c in caps)
    assert captioner.generate(pixels, seed=0) == captions
    assert captioner.generate(pixels, seed=1) != captions


def test_default_models_offline_say_how_to_pass_a_local_directory(monkeypatch) -> None:
    from qformer_lightning.errors import HubUnreachableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="--captioner"):
        Captioner.from_pretrained("Salesforce/blip-image-captioning-large")
    with pytest.raises(HubUnreachableError, match="--clip"):
        ClipScorer.from_pretrained("openai/clip-vit-large-patch14")
