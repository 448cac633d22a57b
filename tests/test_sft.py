"""sft.py: the prompt mask, the loss formula, a tiny model that learns its demonstration, a missing column."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import common
import sft
from conftest import CPU, read_jsonl, write_jsonl


def ok_rows(n: int, offset: int = 0) -> list[dict]:
    """Conversational prompts of different lengths, all answered 'ok'."""
    return [{"prompt": [{"role": "user", "content": f"Say ok {'!' * (i % 5)}{i}"}],
             "completion": [{"role": "assistant", "content": "ok"}]} for i in range(offset, offset + n)]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_are_minus_100_exactly_on_prompt_and_padding(pad_is_eos):
    from conftest import make_tokenizer

    tokenizer = make_tokenizer(pad_is_eos=pad_is_eos)
    plain = Dataset.from_list([{"prompt": "ab", "completion": "xyz"}, {"prompt": "abcde", "completion": "q"}])
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "yo"}]}])
    rows = [row for data in (plain, chat) for row in common.tokenize_prompts(data, tokenizer, max_prompt_length=512)]
    batch = sft.sft_batch(rows, tokenizer.pad_token_id, max_response_length=64)
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        prompt, response = row["input_ids"], row["reference_ids"]
        assert response[-1] == eos  # the response ends with EOS, as the RL scripts cut it
        n, m = len(prompt), len(response)
        width = batch["labels"].shape[1]
        assert batch["input_ids"][i, :n + m].tolist() == prompt + response
        assert batch["labels"][i].tolist() == [-100] * n + response + [-100] * (width - n - m)
        assert batch["attention_mask"][i].tolist() == [1] * (n + m) + [0] * (width - n - m)
    # the chat prompt is the generation prompt, so the response is exactly what generate() would produce
    assert tokenizer.decode(rows[2]["input_ids"]).endswith("<|im_start|>assistant\n")
    # truncation keeps the first response tokens
    cut = sft.sft_batch([rows[0]], tokenizer.pad_token_id, max_response_length=2)
    assert cut["labels"][0].tolist() == [-100] * len(rows[0]["input_ids"]) + rows[0]["reference_ids"][:2]


def test_sft_loss_is_mean_cross_entropy_over_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    # by hand: logits[b, t] predicts labels[b, t + 1]; three labelled positions
    terms = [torch.log_softmax(logits[0, 1], -1)[3], torch.log_softmax(logits[0, 2], -1)[1],
             torch.log_softmax(logits[1, 0], -1)[2]]
    expected = -sum(t.item() for t in terms) / 3
    assert sft.sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_tiny_model_learns_its_demonstration(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "ok.jsonl", ok_rows(200))
    out = tmp_path / "sft"
    sft.main(sft.Args(model=tiny_llama, dataset=data, num_eval_prompts=16, output_dir=str(out), num_epochs=3.0,
                      batch_size=16, lr=3e-3, max_new_tokens=6, reward_fn="tests/pipeline_fns.py:says_ok",
                      log_every=10))
    metrics = read_jsonl(out / "metrics.jsonl")
    final = metrics[-1]
    assert final["eval_score_before"] == 0.0  # a random model does not say "ok<EOS>"
    assert final["eval_loss_before"] > math.log(50)  # near uniform over ~100 characters
    assert final["eval_score_after"] == 1.0  # greedy "ok" + EOS on every held-out prompt
    assert final["eval_loss_after"] < final["eval_loss_before"] / 2
    # the saved folder is a policy the RL scripts load: it answers "ok" and then EOS
    tokenizer = common.load_tokenizer(str(out))
    model = common.load_model(str(out), CPU)
    assert isinstance(model, AutoModelForCausalLM._model_mapping[type(model.config)])
    rows = common.tokenize_prompts(Dataset.from_list(ok_rows(3, offset=1000)), tokenizer, 512)
    query, mask = common.left_pad(rows["input_ids"], tokenizer.pad_token_id)
    responses = common.generate(model, tokenizer, query, mask, max_new_tokens=4, temperature=0)
    assert responses[:, :3].tolist() == [tokenizer("ok", add_special_tokens=False)["input_ids"] +
                                         [tokenizer.eos_token_id]] * 3


def test_missing_completion_column_is_one_clear_line(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}] * 20)
    with pytest.raises(SystemExit) as error:
        sft.main(sft.Args(model="no/such-model", dataset=data, reward_fn=None, output_dir=str(tmp_path / "out")))
    message = str(error.value)
    assert message.startswith("error: ") and "'completion'" in message and "\n" not in message
