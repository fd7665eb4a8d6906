"""Text generation from a trained model, as char-rnn's ``sample.lua``.

The state starts from the model's initial state (batch 1); the prime tokens are fed
one after another and the distribution after the last one gives the first new token.
Without a prime the first token is drawn from a uniform distribution (char-rnn), unless
the caller gives a start token (a word model's sentence end, so that generation begins
a sentence). Each new token is the argmax, or a draw from softmax(logits / temperature),
and is fed back.
"""

from __future__ import annotations

import torch

from rhn_cli.models.base import LanguageModel


@torch.no_grad()
def generate(
    model: LanguageModel,
    prime: list[int],
    length: int,
    *,
    temperature: float = 1.0,
    argmax: bool = False,
    generator: torch.Generator | None = None,
    start: int | None = None,
) -> list[int]:
    """``length`` new token ids after ``prime`` (which is not included)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected more than 0")
    model.eval()
    device = next(model.parameters()).device
    state = model.initial_state(1)
    feed = prime or ([start] if start is not None else [])
    if feed:
        out, state = model(torch.tensor([feed], device=device), state)
        logits = out[0, -1]
    else:  # equal logits: a uniform first draw (argmax: the first symbol)
        probe, _ = model(torch.zeros(1, 1, dtype=torch.long, device=device), state)
        logits = torch.zeros_like(probe[0, -1])
    tokens: list[int] = []
    for _ in range(length):
        if argmax:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
        out, state = model(torch.tensor([[token]], device=device), state)
        logits = out[0, -1]
    return tokens
