"""What the tasks' ``predict_step`` does with the requests of :mod:`qformer_lightning.data.predict`.

Glossary: B batch, Q queries, E ITC width, T text tokens.

Each request (a JSON-ready dict with ``image`` and ``task`` = ``caption`` | ``question`` |
``prompt`` | ``score``) gets one record: the request's fields plus the outputs:

- generation (stage-2 models): ``{"output": text, "llm_prompt": the prompt given to the LLM}``.
  A caption uses the task's prompt (e.g. ``"a photo of"``, possibly empty); a question is put
  into a template: the request's ``prompt`` when it holds ``{}``, else the task's prompt when it
  holds ``{}``, else BLIP-2's zero-shot VQA prompt (``"Question: {} Answer:"`` for decoder-only
  LLMs, ``"Question: {} Short answer:"`` for encoder-decoder ones); a free prompt goes as it is.
- scoring (stage-1 models): ``{"itc": cosine, "itm": probability}``: the ITC similarity (max over
  the Q query features of the cosine with the text feature, in [-1, 1]) and the ITM probability
  that image and text match (softmax of the ITM logits, column "matched").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qformer_lightning.losses.itc import itc_similarity
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.models.blip2_llm import Blip2LLMModel
from qformer_lightning.tasks.text import QFormerTokenizer

QUESTION_TEMPLATE = "Question: {} Answer:"
"""BLIP-2's zero-shot VQA prompt for decoder-only LLMs (OPT)."""
QUESTION_TEMPLATE_ENCODER_DECODER = "Question: {} Short answer:"
"""BLIP-2's zero-shot VQA prompt for encoder-decoder LLMs (FlanT5)."""


def batch_requests(batch: dict[str, Any], score_texts: bool) -> list[dict[str, Any]]:
    """The requests of a batch: ``batch["request"]`` (:class:`~qformer_lightning.data.predict.PredictDataModule`),
    else derived from an annotation batch: ``prompt`` -> free prompts; VQA (``question_id``) ->
    questions from ``text``; otherwise ``text`` -> score requests (``score_texts``, stage-1
    models) or captions.
    """
    if "request" in batch:
        return list(batch["request"])
    size = batch["image"].shape[0]
    keys = list(batch.get("key") or [None] * size)
    if batch.get("prompt") is not None:
        return [{"image": k, "task": "prompt", "prompt": p} for k, p in zip(keys, batch["prompt"])]
    if "question_id" in batch:
        ids = batch["question_id"].tolist()
        return [{"image": k, "task": "question", "question": q, "id": i} for k, q, i in zip(keys, batch["text"], ids)]
    if score_texts:
        return [{"image": k, "task": "score", "text": t} for k, t in zip(keys, batch["text"])]
    return [{"image": k, "task": "caption"} for k in keys]


def question_template(task_prompt: str, encoder_decoder: bool) -> str:
    """The template a question goes into when its request brings none (module docstring)."""
    if "{}" in task_prompt:
        return task_prompt
    return QUESTION_TEMPLATE_ENCODER_DECODER if encoder_decoder else QUESTION_TEMPLATE


def llm_prompt(request: dict[str, Any], task_prompt: str, encoder_decoder: bool) -> str:
    """The LLM prompt of one generation request.

    Raises:
        ValueError: a ``score`` request (a stage-2 model generates; scores need a stage-1 model).
    """
    kind = request.get("task", "caption")
    if kind == "caption":
        return task_prompt
    if kind == "question":
        own = request.get("prompt")
        template = own if own is not None and "{}" in own else question_template(task_prompt, encoder_decoder)
        return template.replace("{}", request["question"])
    if kind == "prompt":
        return request["prompt"]
    raise ValueError(
        f"request {kind!r} for {request.get('image')}: a stage-2 model generates captions/answers/text; "
        "image-text scores (ITC/ITM) need a stage-1 model (Stage1 or Retrieval task)"
    )


@torch.no_grad()
def generate_predictions(
    model: Blip2LLMModel, images: Tensor, requests: list[dict[str, Any]], task_prompt: str, settings: dict[str, Any]
) -> list[dict[str, str]]:
    """Generate for a batch of requests.

    Args:
        model: a built stage-2 model.
        images: (B, 3, S, S) normalised images.
        requests: B generation requests.
        task_prompt: the task's prompt (captions; a question template when it holds ``{}``).
        settings: generation settings for :meth:`Blip2LLMModel.caption` (beams, lengths).

    Returns:
        B records: each request with ``output`` and ``llm_prompt`` added.
    """
    if images.shape[0] != len(requests):
        raise ValueError(f"{images.shape[0]} images but {len(requests)} requests")
    if not requests:
        return []
    encoder_decoder = model.llm.is_encoder_decoder
    prompts = [llm_prompt(r, task_prompt, encoder_decoder) for r in requests]
    texts = model.caption(images, prompts, **settings)
    return [{**r, "output": text, "llm_prompt": prompt} for r, text, prompt in zip(requests, texts, prompts)]


@torch.no_grad()
def score_pairs(model: Blip2QFormerModel, tokenizer: QFormerTokenizer, images: Tensor, texts: list[str]) -> dict[str, Tensor]:
    """ITC similarity and ITM match probability of B image-text pairs.

    Args:
        model: the stage-1 model.
        tokenizer: the Q-Former tokenizer.
        images: (B, 3, S, S) normalised images.
        texts: B texts.

    Returns:
        ``itc`` (B,) max over queries of the cosine between query and text features, ``itm`` (B,)
        probability of "matched".
    """
    device = images.device
    ids, mask = tokenizer(texts, device)  # (B, T), (B, T)
    embeds = model.image_embeds(images)  # (B, N, Dv)
    _, image_feats, _ = model.query_features(embeds)  # (B, Q, E)
    _, text_feat = model.text_features(ids, mask)  # (B, E)
    itc = itc_similarity(image_feats.float(), text_feat.float()).diagonal()  # (B,): pair b is image b, text b
    itm = model.itm_logits(embeds, ids, mask).float().softmax(dim=-1)[:, 1]  # (B,)
    return {"itc": itc, "itm": itm}


def score_predictions(
    model: Blip2QFormerModel, tokenizer: QFormerTokenizer, images: Tensor, requests: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """Scores for a batch of ``score`` requests -> B records: each request with ``itc`` and ``itm`` added.

    Raises:
        ValueError: a request without a text (captions/answers/prompts need a stage-2 model).
    """
    if images.shape[0] != len(requests):
        raise ValueError(f"{images.shape[0]} images but {len(requests)} requests")
    if not requests:
        return []
    for request in requests:
        if request.get("task") != "score" or request.get("text") is None:
            raise ValueError(
                f"request {request.get('task')!r} for {request.get('image')}: a stage-1 model scores image-text pairs "
                "(give `texts`, or `text` in the JSONL); captions, answers and free prompts need a stage-2 model"
            )
    scores = score_pairs(model, tokenizer, images, [r["text"] for r in requests])
    return [{**r, "itc": c, "itm": m} for r, c, m in zip(requests, scores["itc"].tolist(), scores["itm"].tolist())]
