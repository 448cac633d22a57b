"""Deterministic rewards and judges for the pipeline tests (sft, reward, dpo, evaluate): real functions, passed by
name as `--reward-fn tests/pipeline_fns.py:NAME` or `--judge-fn tests/pipeline_fns.py:NAME`, in TRL's keyword
convention: rewards f(prompts, completions, **columns), judges f(prompts, completions=[[a, b], ...], **columns)."""


def text(completion) -> str:
    """A completion as text: a string, or the content of its last message (conversational data)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def says_ok(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0 when the response is exactly 'ok' (the demonstration of the SFT test), else 0.0."""
    return [float(text(c) == "ok") for c in completions]


def response_length(prompts: list, completions: list, **kwargs) -> list[float]:
    """The response's length in characters."""
    return [float(len(text(c))) for c in completions]


def longer_wins(prompts: list, completions: list[list[str]], **kwargs) -> list[str]:
    """Judge: the longer response wins; a tie goes to A."""
    return ["A" if len(a) >= len(b) else "B" for a, b in completions]


def always_a(prompts: list, completions: list[list[str]], **kwargs) -> list[str]:
    """Judge that always answers 'A' (measures where the positions put the policy)."""
    return ["Preferred: A"] * len(completions)


def always_b(prompts: list, completions: list[list[str]], **kwargs) -> list[int]:
    """Judge that always prefers B, answering as TRL's pairwise judges do: the index 1."""
    return [1] * len(completions)


def no_answer(prompts: list, completions: list[list[str]], **kwargs) -> list[str]:
    """Judge whose answers name neither A nor B (each pair counts as a tie)."""
    return ["I cannot decide."] * len(completions)
