"""Tokenisation, masking (the pad == <|im_end|> trap), batching and the shared-prefix loss."""

from pathlib import Path

import pytest
import torch

from adapters.training.data import IGNORE_INDEX, encode_sft, epoch_batches, read_rows
from adapters.training.sft import collate, loss_terms
from adapters.training.tiny import make_tiny_model

SMOL = Path(__file__).resolve().parents[2] / "var" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    from adapters.training.common import load_tokenizer

    return load_tokenizer(str(SMOL))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(SMOL, tmp_path_factory.mktemp("tiny"))
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def test_prompt_is_masked_and_answer_end_of_turn_carries_loss(tokenizer) -> None:
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap is live with this tokenizer
    ex = encode_sft(tokenizer, [{"role": "user", "content": "I am still waiting on my card?"}], "card_arrival", 256)
    labels = ex.labels
    assert all(lab == IGNORE_INDEX for lab in labels[: ex.prompt_len])
    answer = labels[ex.prompt_len:]
    assert IGNORE_INDEX not in answer
    assert tokenizer.decode(answer) == "card_arrival<|im_end|>"
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.pad_token_id
    # The prompt contains <|im_end|> tokens too (end of system/user turns): masked by position, not id.
    assert tokenizer.pad_token_id in ex.input_ids[: ex.prompt_len]
    prompt_text = tokenizer.decode(ex.input_ids[: ex.prompt_len])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "I am still waiting" in prompt_text


def test_an_unfinished_answer_trains_its_tokens_but_no_end_of_turn(tokenizer) -> None:
    prompt = [{"role": "user", "content": "Explain photosynthesis."}]
    cut = encode_sft(tokenizer, prompt, "Plants turn light into", 256, finished=False)
    whole = encode_sft(tokenizer, prompt, "Plants turn light into", 256)
    assert tokenizer.decode(cut.labels[cut.prompt_len:]) == "Plants turn light into"
    assert cut.input_ids == whole.input_ids[:-1] and whole.input_ids[-1] == tokenizer.eos_token_id


def test_collate_masks_padding_but_not_the_answer_end_of_turn(tokenizer) -> None:
    short = encode_sft(tokenizer, [{"role": "user", "content": "hi"}], "a", 256)
    long = encode_sft(tokenizer, [{"role": "user", "content": "a much longer question here"}], "b c d", 256)
    batch = collate([short, long], tokenizer.pad_token_id)
    labels = batch["labels"][0].tolist()
    n = len(short.input_ids)
    assert labels[n - 1] == tokenizer.pad_token_id  # the closing <|im_end|> is a target
    assert all(lab == IGNORE_INDEX for lab in labels[n:])  # padding is not
    assert batch["attention_mask"][0].sum().item() == n
    assert batch["prefix_len"] > 0


def test_truncation_keeps_the_answer(tokenizer) -> None:
    ex = encode_sft(tokenizer, [{"role": "user", "content": "word " * 200}], "the answer", 32)
    assert len(ex.input_ids) == 32
    assert tokenizer.decode(ex.input_ids[ex.prompt_len:]) == "the answer<|im_end|>"


def test_epoch_batches_are_deterministic_complete_and_bucketed() -> None:
    lengths = [(i * 37) % 50 + 5 for i in range(100)]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(100))
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    assert padding < 0.1 * sum(lengths)


def test_shared_prefix_loss_and_gradients_equal_plain_computation(tokenizer, tiny_model) -> None:
    rows = [("hello there", "x y", 1.0), ("what is my balance please", "balance", 2.0), ("card?", "card", 0.5)]
    examples = [encode_sft(tokenizer, [{"role": "user", "content": q}], a, 128, w) for q, a, w in rows]
    shared = collate(examples, tokenizer.pad_token_id, share_prefix=True)
    plain = collate(examples, tokenizer.pad_token_id, share_prefix=False)
    assert shared["prefix_len"] >= 20 and plain["prefix_len"] == 0
    grads = []
    for batch in (shared, plain):
        tiny_model.zero_grad()
        s, n = loss_terms(tiny_model, batch)
        s.backward()
        grads.append((s.item(), n.item(), tiny_model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert grads[0][1] == grads[1][1] == pytest.approx(1.0 * 3 + 2.0 * 2 + 0.5 * 2)  # answer tokens × weight
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6)


def test_unweighted_loss_matches_transformers_loss(tokenizer, tiny_model) -> None:
    ex = [encode_sft(tokenizer, [{"role": "user", "content": "hi"}], "hello friend", 128)]
    batch = collate(ex, tokenizer.pad_token_id)
    with torch.no_grad():
        s, n = loss_terms(tiny_model, batch)
        ref = tiny_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert (s / n).item() == pytest.approx(ref.item(), rel=1e-5)


def test_read_rows_reports_file_and_line(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"kind":"sft","prompt":[{"role":"user","content":"q"}],"completion":"a"}\n{"kind":"sft"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: .*prompt"):
        read_rows(path, "sft")
    path.write_text('{"kind":"preference","prompt":[],"chosen":"a","rejected":"b"}\n')
    with pytest.raises(ValueError, match="no 'sft' rows"):
        read_rows(path, "sft")
    assert len(read_rows(path, "dpo")) == 1


def test_distilled_rows_carry_kl_to_the_base_model_instead_of_their_nll(tokenizer, tiny_model) -> None:
    from dataclasses import replace

    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    task = encode_sft(tokenizer, [{"role": "user", "content": "card?"}], "card_arrival", 128)
    replayed = replace(encode_sft(tokenizer, [{"role": "user", "content": "Why is the sky blue?"}],
                                  "Because air scatters blue light more.", 128), distill=True)
    try:
        batch = collate([task, replayed], tokenizer.pad_token_id)
        with torch.no_grad():
            task_only, _ = loss_terms(model, collate([task], tokenizer.pad_token_id))
            s, n = loss_terms(model, batch)
        # A fresh LoRA (B = 0) is the base model: the distilled row adds nothing, its tokens still count.
        assert s.item() == pytest.approx(task_only.item(), rel=1e-5)
        assert n.item() == (len(task.input_ids) - task.prompt_len) + (len(replayed.input_ids) - replayed.prompt_len)

        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        ids = torch.tensor([replayed.input_ids])
        start = replayed.prompt_len - 1  # logits at this position predict the first answer token
        with torch.no_grad():
            log_q = F.log_softmax(model(input_ids=ids).logits[0, start:-1], -1)
            with model.disable_adapter():
                log_p = F.log_softmax(model(input_ids=ids).logits[0, start:-1], -1)
            expected_kl = (log_p.exp() * (log_p - log_q)).sum().item()
            task_nll, _ = loss_terms(model, collate([task], tokenizer.pad_token_id))
        assert expected_kl > 0.01
        for share in (True, False):
            model.zero_grad()
            s, _ = loss_terms(model, collate([task, replayed], tokenizer.pad_token_id, share_prefix=share))
            assert s.item() == pytest.approx(task_nll.item() + expected_kl, rel=1e-4)
            s.backward()
            lora_grads = [p.grad for name, p in model.named_parameters() if "lora_" in name]
            assert all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    finally:
        model.unload()  # leave the shared fixture model without LoRA layers
