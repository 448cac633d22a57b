"""Fixtures: tiny random models and tokenizers, saved to a temp dir and loaded back through `from_pretrained`; and
the small helpers every test module shares (`from conftest import ROOT, ENV, CPU, REWARDS, write_jsonl, ...`:
pytest puts tests/ on sys.path, so this module is importable as `conftest`).

The offline variables are set before transformers is imported, so nothing waits on the model hub."""

import json
import os
import socket
import string
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""the repository root: the scripts live here, and subprocesses run with it as their cwd"""
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
    PreTrainedTokenizerFast)

# ChatML, as SmolLM2 and Qwen use it: the assistant turn ends with <|im_end|>, which is also EOS.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]

# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
"""environment of a script run in a subprocess: offline, a wide terminal (one-line errors and help stay unwrapped),
one thread per process"""
CPU = torch.device("cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: share the cores, no more threads than cores in all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
REWARDS = os.path.join(ROOT, "tests", "rewards.py")
"""rule rewards (and REFUEL's rule user) for `--reward-fn REWARDS:fraction_of_a` and the like"""


def write_jsonl(path, rows) -> str:
    """Write `rows` (dicts) to the pathlib.Path `path`, one JSON object a line; returns the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    """The rows of a .jsonl file (metrics.jsonl, samples.jsonl, ...)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_prompts(path, n: int = 64) -> str:
    """n counting prompts of varied lengths, each with a one-number reference completion."""
    return write_jsonl(path, [{"prompt": f"Count: {i} {'ab' * (i % 5)}", "completion": f" {i + 1}"} for i in range(n)])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for torchrun's --master-port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII + ChatML specials) with a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(string.printable) - set("\x0b\x0c\r")))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", pad_token="<|im_end|>" if pad_is_eos else "<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(tokenizer, **kwargs) -> LlamaConfig:
    """A 2-layer Llama small enough to train in seconds on a CPU."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **kwargs)


def save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Folder of a tiny random Llama policy with a ChatML tokenizer (pad id != EOS id)."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    return save(LlamaForCausalLM(llama_config(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """Folder of a tiny random GPT-2 (learned absolute positions), pad id == EOS id, as in GPT-2 and SmolLM2."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(pad_is_eos=True)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> str:
    """Folder of a tiny random one-label Llama reward model whose pad id equals its EOS id."""
    torch.manual_seed(1)
    tokenizer = make_tokenizer(pad_is_eos=True)
    model = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1))
    return save(model, tokenizer, tmp_path_factory.mktemp("tiny_rm"))
