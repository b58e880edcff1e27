"""The VQA finetune's `pretrained` list: a stage-1 Hugging Face retrieval checkpoint gives the
Q-Former its text parts, the stage-2 generation checkpoint then gives vision, queries and
projection (tiny random transformers Blip2 models saved to disk; no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from finetune_tiny import BERT
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from convert_tiny import blip2_config, perturb_  # noqa: E402
from stage2_tiny import opt_config, tiny_llm, word_tokenizer  # noqa: E402

from qformer_lightning.convert.hf import build_qformer_from_hf_config, build_vision_from_hf_config  # noqa: E402
from qformer_lightning.models.blip2_llm import Blip2LLMModel  # noqa: E402
from qformer_lightning.tasks.vqa import VQA  # noqa: E402


def test_stage1_text_parts_then_stage2_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage1 = perturb_(Blip2ForImageTextRetrieval(blip2_config()), seed=1).eval()
    stage1.save_pretrained(tmp_path / "stage1")
    vocab = len(word_tokenizer("opt"))
    config = blip2_config(text_input=False, text_config=opt_config(vocab).to_dict())  # the LLM of tiny_llm("opt")
    config.image_token_index = vocab - 1
    stage2 = perturb_(Blip2ForConditionalGeneration(config), seed=2).eval()
    stage2.save_pretrained(tmp_path / "stage2")

    vision = build_vision_from_hf_config(stage1.config.vision_config, image_size=42)  # 2x2 -> 3x3 patches
    qformer = build_qformer_from_hf_config(stage1.config)  # with text parts
    model = Blip2LLMModel(vision, qformer, tiny_llm("opt"))
    task = VQA(model, tokenizer=BERT, max_question_length=16, pretrained=[str(tmp_path / "stage1"), str(tmp_path / "stage2")])
    task.configure_model()

    s1, s2 = stage1.state_dict(), stage2.state_dict()
    q = task.model.qformer
    torch.testing.assert_close(q.word_embeddings.weight, s1["embeddings.word_embeddings.weight"])  # stage 1 only
    torch.testing.assert_close(q.layers[0].text_ffn.fc1.weight, s1["qformer.encoder.layer.0.intermediate.dense.weight"])
    torch.testing.assert_close(q.query_tokens, s2["query_tokens"])  # stage 2 overrides the shared parts
    torch.testing.assert_close(
        q.layers[0].query_ffn.fc1.weight, s2["qformer.encoder.layer.0.intermediate_query.dense.weight"]
    )
    torch.testing.assert_close(task.model.projection.weight, s2["language_projection.weight"])
    llm = task.model.llm.model.state_dict()
    torch.testing.assert_close(llm["model.decoder.layers.0.fc1.weight"], s2["language_model.model.decoder.layers.0.fc1.weight"])
    assert task.model.vision.vit.pos_embed.shape[1] == 1 + 9  # resampled to the finetune resolution
