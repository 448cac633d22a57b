"""Deterministic rewards and judges for the pipeline tests (sft, reward, dpo, evaluate): real functions, passed by
name as `--reward-fn tests/pipeline_fns.py:NAME` or `--judge-fn tests/pipeline_fns.py:NAME`."""


def says_ok(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response is exactly 'ok' (the demonstration of the SFT test), else 0.0."""
    return [float(r == "ok") for r in responses]


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """The response's length in characters."""
    return [float(len(r)) for r in responses]


def longer_wins(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]:
    """Judge: the longer response wins; a tie goes to A."""
    return ["A" if len(a) >= len(b) else "B" for a, b in zip(responses_a, responses_b)]


def always_a(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]:
    """Judge that always answers 'A' (measures where the positions put the policy)."""
    return ["Preferred: A"] * len(responses_a)


def always_b(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]:
    """Judge that always answers 'B'."""
    return ["B"] * len(responses_a)


def no_answer(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]:
    """Judge whose answers name neither A nor B (each pair counts as a tie)."""
    return ["I cannot decide."] * len(responses_a)
