"""The memory features of one process: chunked log-softmax, gradient checkpointing, micro-batched sampling.

(Sharding over processes, FSDP2, is tested under torchrun: test_fsdp.py, test_rebel.py, test_ppo_distributed.py.)"""

import torch

import common
from conftest import CPU


def batch(tokenizer, n: int = 5, width: int = 7):
    """n left-padded prompts of different lengths and random right-padded responses, some ending in EOS."""
    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer(f"q{'x' * i}")["input_ids"] for i in range(n)]
    query, query_mask = common.left_pad(prompts, tokenizer.pad_token_id)
    responses = torch.randint(10, len(tokenizer), (n, width), generator=g)
    responses[0, 3] = tokenizer.eos_token_id
    responses = common.cut_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return query, query_mask, responses, common.eos_mask(responses, tokenizer.eos_token_id)


def test_chunked_log_softmax_gives_the_values_and_gradients_of_the_whole_one(tiny_llama, monkeypatch):
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    query, query_mask, responses, mask = batch(tokenizer)
    # The formula on the whole [B, R, V] logits, at temperature 0.7.
    ids, full_mask = torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
    logits = logits[:, query.shape[1] - 1:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(2, responses[..., None]).squeeze(-1) * mask
    expected_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # Chunks of 2 positions (7 response positions: 4 chunks, the last one short).
    monkeypatch.setattr(common, "LOGPROB_CHUNK", 2 * len(query) * logits.shape[-1])
    logp, entropy = common.logprobs(model, query, query_mask, responses, mask, 0.7, entropy=True)
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)
    logp.sum().backward()
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(common.logprobs(model, query, query_mask, responses, mask, 0.7, micro_batch=2),
                                   expected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(tiny_llama):
    tokenizer = common.load_tokenizer(tiny_llama)
    query, query_mask, responses, mask = batch(tokenizer)
    grads, block_calls = [], []
    for checkpointing in (False, True):
        model = common.wrap(common.load_model(tiny_llama, CPU), CPU, torch.float32,
                            gradient_checkpointing=checkpointing)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops
        # early, once it has every tensor the backward needs: a post-hook might not see it)
        common.logprobs(model, query, query_mask, responses, mask, 0.7).sum().backward()
        grads.append([p.grad for p in model.parameters()])
        block_calls.append(len(calls))
        # sampling switches to eval mode (the KV cache works) and back
        common.generate(model, tokenizer, query, query_mask, 3, 0.0)
        assert model.training == checkpointing
    assert block_calls == [1, 2]  # the checkpointed block ran again in the backward pass
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sampling_in_micro_batches(tiny_llama):
    """Greedy responses do not depend on --generation-batch-size. Sampled ones come from the same distribution but
    are not the same sequences: the sampler draws every step's random numbers for the sequences of one generate
    call together from the one torch generator, so splitting the batch hands different numbers to each sequence."""
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    query, query_mask, _, _ = batch(tokenizer)
    whole = common.generate(model, tokenizer, query, query_mask, 8, 0.0)
    assert torch.equal(common.generate(model, tokenizer, query, query_mask, 8, 0.0, batch_size=2), whole)
    torch.manual_seed(0)
    sampled = common.generate(model, tokenizer, query, query_mask, 8, 1.0, batch_size=2)
    torch.manual_seed(0)
    assert torch.equal(common.generate(model, tokenizer, query, query_mask, 8, 1.0, batch_size=2), sampled)
    torch.manual_seed(0)
    assert torch.equal(common.generate(model, tokenizer, query[:2], query_mask[:2], 8, 1.0), sampled[:2])
    assert common.generate(model, tokenizer, query[:0], query_mask[:0], 8, 1.0).shape == (0, 8)  # no rows


def test_static_generation_backend_samples_the_same_tokens(tiny_llama, tiny_gpt2):
    """--generation-backend static (preallocated KV cache, prompts left-padded to a multiple of STATIC_BUCKET)
    samples exactly what plain generate samples: the same tokens for the same seed, on prompts of uneven lengths,
    for a rotary (Llama) and an absolute-position (GPT-2) model. (On a GPU it also compiles the decoding step:
    bench/sampling_speed.py checks that path there.)"""
    for path in (tiny_llama, tiny_gpt2):
        model, tokenizer = common.load_model(path, CPU), common.load_tokenizer(path)
        query, query_mask, _, _ = batch(tokenizer)
        assert common.STATIC_BUCKET > query.shape[1]  # the static call really pads
        out = {}
        for backend in ("dynamic", "static"):
            torch.manual_seed(0)
            out[backend] = common.generate(model, tokenizer, query, query_mask, 12, 1.0, backend=backend)
        assert torch.equal(out["static"], out["dynamic"])
        assert len(set(map(tuple, out["dynamic"].tolist()))) == len(query)  # sampled, distinct: not a trivial match
        greedy = common.generate(model, tokenizer, query, query_mask, 12, 0.0, batch_size=2, backend="static")
        assert torch.equal(greedy, common.generate(model, tokenizer, query, query_mask, 12, 0.0, backend="dynamic"))


def test_static_backend_under_autocast_samples_from_a_refreshed_bf16_copy(tiny_llama):
    """Under bf16 autocast over fp32 weights the static backend samples from a bf16 copy of the weights (keys would
    be fp32 and values bf16 otherwise, which one static cache cannot hold): the copy is made once, follows every
    update of the policy in place (same tensors, new values), is not part of the policy (no new parameters or
    state-dict keys), and its greedy answers are those of the policy cast to bf16."""
    model, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    query, query_mask, _, _ = batch(tokenizer)
    keys = set(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        common.generate(model, tokenizer, query, query_mask, 6, 1.0, backend="static")
    shadow = common.sampling_copy(model, torch.bfloat16)
    assert set(model.state_dict()) == keys and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in shadow.parameters())
    first = [p.data_ptr() for p in shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        greedy = common.generate(model, tokenizer, query, query_mask, 6, 0.0, backend="static")
    assert [p.data_ptr() for p in shadow.parameters()] == first
    for s, p in zip(shadow.parameters(), model.parameters()):
        assert torch.equal(s, p.detach().to(torch.bfloat16))
    cast = common.load_model(tiny_llama, CPU)
    cast.load_state_dict(model.state_dict())
    cast.to(torch.bfloat16)
    assert torch.equal(greedy, common.generate(cast, tokenizer, query, query_mask, 6, 0.0, backend="dynamic"))


def test_static_backend_leaves_a_lora_model_under_autocast_to_plain_generate(tiny_llama):
    """A bf16 copy of a LoRA policy would not follow its adapter being switched off for pi_ref (`as_reference`), so
    under autocast over fp32 weights the static backend samples such a model the plain way: no copy is made, and the
    reference's samples (adapter off) are the base model's."""
    import rebel
    policy = common.load_model(tiny_llama, CPU, lora=rebel.Args(lora_r=4))
    with torch.no_grad():  # a trained adapter: policy and reference now differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    base, tokenizer = common.load_model(tiny_llama, CPU), common.load_tokenizer(tiny_llama)
    query, query_mask, _, _ = batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with common.as_reference(policy, None) as ref:
            greedy_ref = common.generate(ref, tokenizer, query, query_mask, 8, 0.0, backend="static")
        greedy_policy = common.generate(policy, tokenizer, query, query_mask, 8, 0.0, backend="static")
        greedy_base = common.generate(base, tokenizer, query, query_mask, 8, 0.0, backend="dynamic")
    assert policy not in common._SAMPLING_COPIES
    assert torch.equal(greedy_ref, greedy_base) and not torch.equal(greedy_policy, greedy_base)
