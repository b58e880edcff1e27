"""LLM adapter: batch layout and loss masking (hand examples), prefix LM, generation padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stage2_tiny import Q, tiny_llm, tiny_model

from qformer_lightning.encoders.llm import LanguageModel, pad_sequences, resolve_path, sample_prefix_splits
from qformer_lightning.tasks.stage2 import lm_loss

# Word ids of the tiny tokenizers (stage2_tiny.WORDS): OPT-like ids = word index + 4, T5-like = + 3.
OPT = dict(bos=2, eos=2, pad=1, a=4, photo=5, of=6, dog=8, cat=9, sits=10, what=26, two=31, dot=40)
T5 = dict(eos=1, pad=0, a=3, photo=4, of=5, dog=7, cat=8, what=25, two=30, blue=14)
M = -100


def test_adapter_builds_tiny_without_files() -> None:
    llm = tiny_llm("opt")
    assert llm.hidden_size == 16 and not llm.is_encoder_decoder and llm.pad_token_id == 1
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.model.training
    t5 = tiny_llm("t5")
    assert t5.is_encoder_decoder and t5.stop_token_id == 1
    llm.train()
    assert not llm.model.training  # a frozen LM stays in eval mode


def test_decoder_only_layout_and_labels_hand_example() -> None:
    llm = tiny_llm("opt")
    soft = torch.randn(2, Q, 16)
    inputs = llm.training_inputs(soft, ["a dog", "two cat"], ["a photo of", "what"])
    o = OPT
    assert inputs.input_ids.tolist() == [
        [o["bos"], o["a"], o["photo"], o["of"], o["a"], o["dog"], o["eos"]],
        [o["bos"], o["what"], o["two"], o["cat"], o["eos"], o["pad"], o["pad"]],
    ]
    assert inputs.labels.tolist() == [
        [M] * Q + [M, M, M, M, o["a"], o["dog"], o["eos"]],
        [M] * Q + [M, M, o["two"], o["cat"], o["eos"], M, M],
    ]
    assert inputs.attention_mask.tolist() == [[1] * (Q + 7), [1] * (Q + 5) + [0, 0]]
    assert torch.equal(inputs.inputs_embeds[:, :Q], soft)
    torch.testing.assert_close(inputs.inputs_embeds[:, Q:], llm.embed(inputs.input_ids))


def test_target_suffix_truncation_and_no_prompt() -> None:
    llm = tiny_llm("opt", target_suffix=".", max_text_length=2)
    assert llm.stop_token_id == OPT["dot"]
    inputs = llm.training_inputs(torch.zeros(1, Q, 16), ["a dog sits"])
    o = OPT
    # no prompt: only the BOS; the caption is cut to 2 tokens and the stop token is kept after it
    assert inputs.input_ids.tolist() == [[o["bos"], o["a"], o["dog"], o["dot"]]]
    assert inputs.labels.tolist() == [[M] * Q + [M, o["a"], o["dog"], o["dot"]]]
    with pytest.raises(ValueError, match="exactly one"):
        tiny_llm("opt", target_suffix="a dog")


def test_loss_counts_only_target_tokens() -> None:
    """lm_loss on the adapter's (possibly trimmed) logits = CE over the hand-picked target positions."""
    llm = tiny_llm("opt")
    torch.manual_seed(0)
    soft = torch.randn(2, Q, 16)
    inputs = llm.training_inputs(soft, ["a dog", "two cat"], ["a photo of", "what"])
    logits, labels = llm(inputs)
    assert logits.shape[1] == inputs.input_ids.shape[1] + 1  # text part + the last query position
    loss = lm_loss(logits, labels, shift=True)
    full = llm.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    # targets at sequence positions (row 0) Q+4..Q+6 and (row 1) Q+2..Q+4, predicted one position earlier
    picks = [(0, Q + 4, OPT["a"]), (0, Q + 5, OPT["dog"]), (0, Q + 6, OPT["eos"]),
             (1, Q + 2, OPT["two"]), (1, Q + 3, OPT["cat"]), (1, Q + 4, OPT["eos"])]
    expected = torch.stack([F.cross_entropy(full[r, p - 1], torch.tensor(t)) for r, p, t in picks]).mean()
    torch.testing.assert_close(loss, expected)


def test_seq2seq_finetune_layout_hand_example() -> None:
    llm = tiny_llm("t5")
    inputs = llm.training_inputs(torch.zeros(2, Q, 16), ["a dog", "blue"], ["a photo of", "what"])
    t = T5
    assert inputs.input_ids.tolist() == [[t["a"], t["photo"], t["of"], t["eos"]], [t["what"], t["eos"], t["pad"], t["pad"]]]
    assert inputs.attention_mask.tolist() == [[1] * (Q + 4), [1] * (Q + 2) + [0, 0]]
    assert inputs.labels.tolist() == [[t["a"], t["dog"], t["eos"]], [t["blue"], t["eos"], M]]
    assert inputs.decoder_attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_prefix_split_range_and_seeding() -> None:
    g = torch.Generator().manual_seed(3)
    draws = [sample_prefix_splits([8, 5, 2, 1], g) for _ in range(200)]
    assert {d[0] for d in draws} == {1, 2, 3, 4} and {d[1] for d in draws} == {1, 2}
    assert {d[2] for d in draws} == {1} and {d[3] for d in draws} == {0}
    again = [sample_prefix_splits([8, 5, 2, 1], torch.Generator().manual_seed(3)) for _ in range(1)]
    assert again[0] == draws[0]


def _encoder_ids(llm: LanguageModel, run) -> list[torch.Tensor]:
    """Token ids of every encoder input the LM sees during ``run()`` (recovered from the embeddings)."""
    seen = []
    table = llm.model.get_input_embeddings().weight

    def hook(module, args, kwargs):
        embeds = kwargs["inputs_embeds"][:, Q:]  # drop the soft prompt
        match = (embeds[:, :, None, :] == table[None, None]).all(-1)  # (B, P, V)
        assert (match.sum(-1) == 1).all(), "an encoder input row is not a token embedding"
        seen.append(match.float().argmax(-1))

    handle = llm.model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_no_target_token_reaches_the_encoder() -> None:
    """Prefix LM and finetune mode: the encoder sees the prefix/prompt ids only, never a target id."""
    model = tiny_model("t5")
    llm = model.llm
    captions = ["a photo of the dog sits on grass", "red big man rides bike", "two"]
    images = torch.randn(3, 3, 28, 28)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        holder = {}

        def run():
            holder["labels"] = model(images, captions, prefix_lm=True, generator=g)[1]

        (enc,) = _encoder_ids(llm, run)
        for row, caption in enumerate(captions):
            ids = llm.tokenize([caption], 32)[0]
            target = [t for t in holder["labels"][row].tolist() if t != M]
            prefix = [t for t in enc[row].tolist() if t != T5["pad"]][:-1]  # drop </s>
            assert target[-1] == T5["eos"]
            assert prefix + target[:-1] == ids  # prefix and target partition the caption
            assert len(ids) < 2 or 1 <= len(prefix) <= len(ids) // 2
            assert not set(prefix) & set(target[:-1])  # caption words are distinct: no overlap
    # finetune: prompt -> encoder, answer -> decoder
    holder = {}
    prompts, answers = ["what is the color of sky", "how many", "question"], ["blue", "two", "yes"]

    def run_ft():
        holder["labels"] = model(images, answers, prompts)[1]

    (enc,) = _encoder_ids(llm, run_ft)
    for row in range(3):
        seen = set(enc[row].tolist())
        target = {t for t in holder["labels"][row].tolist() if t not in (M, T5["eos"])}
        assert target and not seen & target


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("beams", [1, 4])
def test_batched_generation_equals_unbatched(kind: str, beams: int) -> None:
    model = tiny_model(kind)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of the", "what", "question how many boat under the tree answer"]
    settings = dict(num_beams=beams, max_new_tokens=6, min_new_tokens=2)
    batched = model.generate(images, prompts, **settings)
    for row in range(3):
        single = model.generate(images[row : row + 1], prompts[row : row + 1], **settings)[0]
        padded = torch.full((batched.shape[1],), model.llm.pad_token_id)
        padded[: single.shape[0]] = single
        assert torch.equal(batched[row], padded), (kind, beams, row, batched[row].tolist(), single.tolist())
    again = model.generate(images, prompts, **settings)
    assert torch.equal(batched, again)  # deterministic


def test_tokenizer_without_bos_and_empty_prompt() -> None:
    """SmolLM2-style tokenizers add no special tokens: the caption follows the soft prompt directly,
    and generation from the soft prompt alone works."""
    model = tiny_model("opt", bos=False)
    llm = model.llm
    inputs = llm.training_inputs(torch.zeros(1, Q, 16), ["a dog"])
    assert inputs.input_ids.tolist() == [[OPT["a"], OPT["dog"], OPT["eos"]]]
    assert inputs.labels.tolist() == [[M] * Q + [OPT["a"], OPT["dog"], OPT["eos"]]]
    logits, labels = llm(inputs)
    assert labels[0, 1].item() == OPT["a"]  # predicted from the last soft-prompt position
    out = model.generate(torch.randn(2, 3, 28, 28), num_beams=2, max_new_tokens=3)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3


def test_left_padding_for_decoder_generation() -> None:
    llm = tiny_llm("opt")
    soft = torch.randn(2, Q, 16)
    embeds, mask = llm.generation_inputs(soft, ["a photo of", "what"])
    # rows: [pad pad | soft | </s> what] and [soft | </s> a photo of]
    assert mask.tolist() == [[1] * (Q + 4), [0, 0] + [1] * (Q + 2)]
    torch.testing.assert_close(embeds[1, 2 : 2 + Q], soft[1])
    torch.testing.assert_close(embeds[0, :Q], soft[0])


def test_decode_stops_at_stop_token() -> None:
    llm = tiny_llm("opt")
    ids = torch.tensor([[OPT["a"], OPT["dog"], OPT["eos"], OPT["cat"]], [OPT["two"], OPT["eos"], OPT["pad"], OPT["pad"]]])
    assert llm.decode(ids) == ["a dog", "two"]


def test_generation_stops_at_the_llms_own_end_token() -> None:
    """With a target suffix (".") the LLM's own EOS still ends a caption: the tiny OPT is made to
    prefer its EOS at every step; it stops right after min_new_tokens instead of running to the limit."""
    llm = tiny_llm("opt", target_suffix=".")
    assert llm.stop_token_ids == [OPT["dot"], OPT["eos"]]  # the suffix, then the EOS (= BOS for OPT)
    assert tiny_llm("t5").stop_token_ids == [T5["eos"]]
    decoder = llm.model.model.decoder
    with torch.no_grad():  # every position's hidden state = a multiple of EOS's embedding: EOS is the argmax
        decoder.final_layer_norm.weight.zero_()
        decoder.final_layer_norm.bias.copy_(10 * llm.model.get_input_embeddings().weight[OPT["eos"]])
    soft = torch.randn(2, Q, 16)
    for beams in (1, 3):
        out = llm.generate(soft, num_beams=beams, max_new_tokens=8, min_new_tokens=2)
        assert out.shape == (2, 3), (beams, out.tolist())  # two forced tokens, then the EOS
        assert (out[:, 2] == OPT["eos"]).all() and not (out[:, :2] == OPT["eos"]).any()
        assert all(len(text.split()) == 2 for text in llm.decode(out))
    # before: generation stopped only at the suffix token and ran to max_new_tokens
    from transformers import GenerationConfig

    embeds, mask = llm.generation_inputs(soft)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=2, eos_token_id=OPT["dot"], pad_token_id=OPT["pad"])
    assert llm.generate_ids(embeds, mask, config).shape == (2, 8)


def test_pad_sequences_and_errors(tmp_path) -> None:
    ids, mask = pad_sequences([[5, 6], [7]], 0, "left")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = pad_sequences([[5, 6], [7]], 0, "right")
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="model_type"):
        LanguageModel(random_init=True)
    with pytest.raises(ValueError, match="dtype"):
        LanguageModel("x", dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float16"):
        LanguageModel(random_init=True, config_overrides={"model_type": "t5", "d_model": 8}, dtype="float16").load()
    with pytest.raises(RuntimeError, match="not loaded"):
        LanguageModel("facebook/opt-125m").hidden_size
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("package:no_such_package_here")
    with pytest.raises(ValueError, match="decoder-only"):
        tiny_llm("opt").training_inputs(torch.zeros(1, Q, 16), ["a dog"], prefix_lm=True)


def test_random_init_from_overrides_and_dtype(tmp_path) -> None:
    """load(): a config-only random build (no model files; a local tokenizer) in bfloat16."""
    from stage2_tiny import word_tokenizer

    word_tokenizer("opt").save_pretrained(tmp_path)
    overrides = dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     word_embed_proj_dim=16, vocab_size=42, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    llm = LanguageModel(random_init=True, dtype="bfloat16", tokenizer=str(tmp_path), config_overrides=overrides)
    assert not llm.loaded and not llm.has_weight_source
    llm.load()
    assert next(llm.model.parameters()).dtype == torch.bfloat16 and llm.hidden_size == 16
    inputs = llm.training_inputs(torch.randn(1, Q, 16), ["a dog"])
    assert inputs.inputs_embeds.dtype == torch.bfloat16  # the fp32 soft prompt is cast to the LM's dtype
    assert inputs.input_ids.tolist() == [[OPT["bos"], OPT["a"], OPT["dog"], OPT["eos"]]]


def test_projection_init_at_the_embedding_scale() -> None:
    """``projection_init="embedding_scale"``: unit-variance query outputs give soft prompts with the
    standard deviation of the LLM's input embeddings; ``"default"`` keeps PyTorch's (LAVIS's) init."""
    from qformer_lightning.models.blip2_llm import Blip2LLMModel
    from stage2_tiny import tiny_vision_qformer

    vision, qformer = tiny_vision_qformer()
    torch.manual_seed(0)
    model = Blip2LLMModel(vision, qformer, tiny_llm("opt"), projection_init="embedding_scale")
    target = model.llm.model.get_input_embeddings().weight.std().item()
    queries = torch.randn(4096, qformer.hidden_size, generator=torch.Generator().manual_seed(1))
    prompts = model.projection(queries)
    assert prompts.std().item() == pytest.approx(target, rel=0.1)
    assert torch.count_nonzero(model.projection.bias) == 0
    default = Blip2LLMModel(*tiny_vision_qformer(), tiny_llm("opt"))
    bound = 1 / qformer.hidden_size**0.5  # nn.Linear's kaiming-uniform bound
    assert default.projection.weight.abs().max() <= bound and default.projection.weight.std() > 0.5 * bound / 3**0.5
    with pytest.raises(ValueError, match="projection_init"):
        Blip2LLMModel(*tiny_vision_qformer(), tiny_llm("opt"), projection_init="xavier")


def _byte_level_tokenizer():
    """A tiny byte-level BPE tokenizer (as OPT's and SmolLM2's), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a photo of a red square", "a picture of two blue circles", "a photo of a cat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def test_targets_continue_their_prompt_with_a_word_start_for_byte_level_bpe() -> None:
    """A byte-level BPE target after "a photo of" starts with a space token, so the model learns
    (and generates) "a photo of a red square", not "a photo ofa red square"."""
    from transformers import AutoModelForCausalLM

    tok = _byte_level_tokenizer()
    llm = LanguageModel.from_modules(AutoModelForCausalLM.from_config(__import__("stage2_tiny").opt_config(len(tok))), tok)
    assert llm.space_starts_words
    inputs = llm.training_inputs(torch.zeros(1, Q, llm.hidden_size), ["a red square"], ["a photo of"])
    ids = inputs.input_ids[0][inputs.attention_mask[0, Q:].bool()].tolist()
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red square"
    assert llm.continuations(["a red square"], [""]) == ["a red square"]  # no prompt: nothing to continue
    word_level = tiny_llm("opt")  # a word-level tokenizer marks no word starts: targets unchanged
    assert not word_level.space_starts_words
    assert word_level.continuations(["red"], ["a photo of"]) == ["red"]
