"""Rule rewards that a tiny random model can learn, for the learning tests (`--reward-fn tests/rewards.py:NAME`)."""


def fraction_of_a(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are the letter 'a' (0 for an empty response)."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def fraction_of_digits(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are digits (0 for an empty response)."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


# Multi-turn (refuel.py): users and rewards are functions of whole conversations (lists of {role, content}).
def echo_user(conversations: list[list[dict]]) -> list[str]:
    """Rule user: asks about the start of the assistant's last answer, so the next question depends on it."""
    return [f"more on {c[-1]['content'][:3]!r}?" for c in conversations]


def dialogue_fraction_of_a(conversations: list[list[dict]]) -> list[float]:
    """Fraction of the letter 'a' among the characters of all the assistant's answers (0 if they are all empty)."""
    answers = ["".join(m["content"] for m in c if m["role"] == "assistant") for c in conversations]
    return [a.count("a") / max(len(a), 1) for a in answers]
