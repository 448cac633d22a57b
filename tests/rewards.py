"""Rule rewards that a tiny random model can learn, for the learning tests (`--reward-fn tests/rewards.py:NAME`), in
TRL's convention f(prompts, completions, **columns)."""


def text(completion) -> str:
    """A completion as text: a string, or the content of its last message (conversational data)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def fraction_of_a(prompts: list, completions: list, **kwargs) -> list[float]:
    """Fraction of the response's characters that are the letter 'a' (0 for an empty response)."""
    return [text(c).count("a") / max(len(text(c)), 1) for c in completions]


def fraction_of_digits(prompts: list, completions: list, **kwargs) -> list[float]:
    """Fraction of the response's characters that are digits (0 for an empty response)."""
    return [sum(ch.isdigit() for ch in text(c)) / max(len(text(c)), 1) for c in completions]


# Multi-turn (refuel.py): the user reads whole conversations; the reward gets each dialogue as TRL's conversational
# prompt (everything before the last answer) and completion (the last answer, a one-message list).
def echo_user(conversations: list[list[dict]]) -> list[str]:
    """Rule user: asks about the start of the assistant's last answer, so the next question depends on it."""
    return [f"more on {c[-1]['content'][:3]!r}?" for c in conversations]


def dialogue_fraction_of_a(prompts: list[list[dict]], completions: list[list[dict]], **kwargs) -> list[float]:
    """Fraction of the letter 'a' among the characters of all the assistant's answers (0 if they are all empty)."""
    answers = ["".join(m["content"] for m in p + c if m["role"] == "assistant") for p, c in zip(prompts, completions)]
    return [a.count("a") / max(len(a), 1) for a in answers]


def dialogue_length(prompts: list[list[dict]], completions: list[list[dict]], **kwargs) -> list[float]:
    """Characters of all the assistant's answers, over 100: a score that differs between almost any two dialogues."""
    return [sum(len(m["content"]) for m in p + c if m["role"] == "assistant") / 100
            for p, c in zip(prompts, completions)]
