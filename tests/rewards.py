"""Rule rewards that a tiny random model can learn, for the learning tests (`--reward-fn tests/rewards.py:NAME`)."""


def fraction_of_a(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are the letter 'a' (0 for an empty response)."""
    return [r.count("a") / max(len(r), 1) for r in responses]
