"""Every tensor our training code builds lands on the model's device (GPU readiness without a GPU).

The model and the image batch are moved to PyTorch's ``meta`` device, which carries shapes but no
data. An operation that mixes a meta tensor with one built on the CPU (``torch.arange(n)``
without ``device=``, a mask from ``torch.ones(...)``) raises "Tensor on device cpu is not on the
expected device meta!", the same mistake that fails a CUDA run with a device mismatch. Meta
tensors also refuse every read of device data on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero``, boolean-mask indexing), so the same runs show that these computations
make no host sync, which on a GPU would stall the queue of kernels. (The one deliberate sync of a
training step is the non-finite-loss check in ``Blip2Task.guard_loss``, not probed here.)

Only our code is probed: transformers' LLM forward reads its masks on the host (``.item()``),
which meta tensors cannot do, so stage 2 is followed up to the laid-out LLM inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_stage1 import IMAGE, one_batch, tiny_stage1

from qformer_lightning.data.synthetic import make_synthetic_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune"))
from finetune_tiny import BERT, tiny_model  # noqa: E402

META = torch.device("meta")


@pytest.fixture(scope="module")
def stage1_batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    corpus = make_synthetic_corpus(
        tmp_path_factory.mktemp("placement") / "synthetic", num_train=16, num_val=8, num_test=8, image_size=IMAGE, shard_size=16
    )
    return one_batch(corpus, batch_size=6)


def test_stage1_losses_and_backward_stay_on_the_model_device(stage1_batch: dict) -> None:
    task = tiny_stage1()
    task.train()
    task.to(META)
    batch = dict(stage1_batch, image=stage1_batch["image"].to(META))  # image ids stay on the host, as the loader gives them
    losses = task.compute_losses(batch)
    assert set(losses) == {"itc", "itm", "itg", "loss"}
    assert all(value.device == META for value in losses.values())
    losses["loss"].backward()
    trainable = [(name, p) for name, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.device == META for _, p in trainable)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_inputs_are_laid_out_on_the_model_device(kind: str) -> None:
    model = tiny_model(kind, text_ffn=True).to(META)
    images = torch.zeros(2, 3, 32, 32, device=META)
    soft = model.soft_prompt(images)  # ViT, Q-Former query pass, projection
    assert soft.device == META and soft.shape[:2] == (2, 4)
    llm = model.llm
    layouts = [llm.training_inputs(soft, ["a dog sits", "red boat on water"], ["a photo of", "a photo of"])]
    if llm.is_encoder_decoder:
        layouts.append(llm.training_inputs(soft, ["a dog sits on the grass", "red boat"], prefix_lm=True,
                                           generator=torch.Generator().manual_seed(0)))
    for inputs in layouts:
        for name in ("inputs_embeds", "attention_mask", "labels", "input_ids"):
            assert getattr(inputs, name).device == META, name
    embeds, mask = llm.generation_inputs(soft, ["Question: what? Answer:", "a photo of"])
    assert embeds.device == META and mask.device == META


def test_vqa_question_reaches_the_qformer_on_the_model_device() -> None:
    from qformer_lightning.tasks.vqa import VQA

    task = VQA(tiny_model("t5", text_ffn=True), tokenizer=BERT, max_question_length=16)
    task.configure_model()
    task.to(META)
    question = task.qformer_question(["what is on the water", "what color is the sky"])
    queries = task.model.query_outputs(torch.zeros(2, 3, 32, 32, device=META), question)
    assert queries.device == META and queries.shape[:2] == (2, 4)
