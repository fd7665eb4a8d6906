"""``rhn sample``: load a trained model and its vocabulary, turn text into ids and back.

Word models read the prime as whitespace-separated words and print words joined by
spaces (``<eos>`` as a line break); character models read and print characters (byte
datasets are decoded as UTF-8 for printing). Vocabularies of multi-character symbols
(the synthetic source's ``s0 s1 ...``) are read and printed like words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rhn_cli.experiment.resume import recorded_config, resolve_checkpoint
from rhn_cli.experiment.schema import ConfigError

SENTENCE_END = "<eos>"


@dataclass
class Sample:
    prime: str
    text: str  # the prime (as the model read it) followed by the generated text
    checkpoint: Path


def _tokens(prime: str, spaced: bool) -> list[str]:
    return prime.split() if spaced else list(prime)


def _render(symbols: list[str], spaced: bool, byte_level: bool) -> str:
    if spaced:  # words: spaces between them, a line break for each sentence end
        pieces, line_start = [], True
        for symbol in symbols:
            if symbol == SENTENCE_END:
                pieces.append("\n")
                line_start = True
            else:
                pieces.append(symbol if line_start else " " + symbol)
                line_start = False
        return "".join(pieces)
    text = "".join(symbols)
    if byte_level:
        return text.encode("latin-1", errors="replace").decode("utf-8", errors="replace")
    return text


def sample_text(
    target: str,
    runs_dir: Path,
    *,
    prime: str = "",
    length: int = 200,
    temperature: float = 1.0,
    argmax: bool = False,
    seed: int | None = None,
    echo=print,
) -> Sample:
    """Generate ``length`` tokens from the model of ``target`` (run id, run directory or
    checkpoint). Raises ConfigError for a prime with symbols outside the vocabulary."""
    import torch

    from rhn_cli.data.registry import get_spec, load_corpus
    from rhn_cli.engine.device import here_or_auto, pick_device
    from rhn_cli.engine.sampling import generate
    from rhn_cli.models import build_model

    path, saved = resolve_checkpoint(target, runs_dir, "sample")
    config = recorded_config(saved["config"])
    corpus = load_corpus(config, echo=echo)
    index = {symbol: i for i, symbol in enumerate(corpus.vocab)}
    spaced = corpus.level == "word" or any(len(symbol) != 1 for symbol in corpus.vocab)
    prime_symbols = _tokens(prime, spaced)
    unknown = sorted({s for s in prime_symbols if s not in index})
    if unknown:
        shown = ", ".join(repr(s) for s in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ConfigError(
            f"--prime has {len(unknown)} symbol(s) not in the {corpus.name} vocabulary: {shown}"
        )
    # On the run's device (its GPU) where this machine has it: the draws are made on the
    # CPU from the seed, so a seed gives the same text wherever the logits agree.
    model = build_model(config, corpus.vocab_size).to(pick_device(here_or_auto(config["device"])))
    model.load_state_dict(saved["model"])
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed())
    start = index.get(SENTENCE_END) if corpus.level == "word" else None
    ids = generate(
        model,
        [index[s] for s in prime_symbols],
        length,
        temperature=temperature,
        argmax=argmax,
        generator=generator,
        start=start,
    )
    byte_level = get_spec(corpus.name).tokenizer == "bytes" if corpus.name else False
    symbols = [corpus.vocab[i] for i in ids]
    return Sample(prime, _render(prime_symbols + symbols, spaced, byte_level), path)
