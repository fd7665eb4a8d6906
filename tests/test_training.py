"""The reference training loop: batching, loss scale, L2 term, clipping, SGD, schedule.

Expected values come from the spec (rhn_reference.md §3, §4.5) or from a separate
computation written out here, never from the engine's own output.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rhn_cli.data.batching import SplitTooShortError, minibatches, num_minibatches
from rhn_cli.data.corpus import Corpus
from rhn_cli.engine.objective import (
    add_l2_gradient,
    l2_penalty,
    learning_rate_at,
    sequence_loss,
)
from rhn_cli.engine.train import RunContext, Trainer, TrainingDiverged, train
from rhn_cli.experiment.schema import defaults
from rhn_cli.models import build_model
from tests.conftest import Recorder


@pytest.mark.parametrize(
    ("tokens", "batch_size", "num_steps", "steps"),
    [
        (929_589, 20, 35, 1327),  # PTB train
        (73_760, 20, 35, 105),  # PTB valid, batched
        (82_430, 20, 35, 117),  # PTB test, batched
        (82_430, 1, 1, 82_429),  # PTB test, non-batched
        (90_000_000, 128, 50, 14_062),  # enwik8 train
        (5_000_000, 128, 50, 781),  # enwik8 valid
    ],
)
def test_minibatches_per_pass_match_the_reference_table(tokens, batch_size, num_steps, steps):
    assert num_minibatches(tokens, batch_size, num_steps) == steps


def test_minibatches_are_contiguous_rows_with_shifted_targets():
    data = np.arange(103)
    batches = list(minibatches(data, batch_size=4, num_steps=5))
    # batch_len = 25, so row b starts at 25*b; (25 - 1) // 5 = 4 steps.
    assert len(batches) == 4
    x0, y0 = batches[0]
    assert x0[:, 0].tolist() == [0, 25, 50, 75]
    assert np.array_equal(y0, x0 + 1)
    x1, _ = batches[1]
    assert np.array_equal(x1[:, 0], x0[:, -1] + 1)  # rows continue across steps


def test_a_split_too_short_for_one_minibatch_is_a_clear_error():
    with pytest.raises(SplitTooShortError, match="valid split has 50 tokens.*batch_size=20"):
        next(minibatches(np.arange(50), 20, 35, "valid"))


def test_sequence_loss_is_summed_over_time_and_averaged_over_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)
    targets = torch.randint(0, 6, (3, 4))
    log_probs = torch.log_softmax(logits, -1)
    per_token = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    expected = per_token.sum(dim=1).mean()  # sum over T, mean over B
    assert sequence_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sequence_loss(logits, targets).item() == pytest.approx(
        4 * per_token.mean().item(), rel=1e-6
    )


def test_l2_penalty_is_tensorflow_l2_loss_over_every_parameter():
    model = build_model({**defaults(), "hidden_size": 8, "depth": 2}, vocab_size=5)
    params = list(model.parameters())
    expected = 1e-3 * sum(float((p.detach().double() ** 2).sum()) / 2 for p in params)
    with torch.no_grad():
        assert float(l2_penalty(params, 1e-3)) == pytest.approx(expected, rel=1e-5)
    # Biases included: T biases (init_bias) alone contribute D * H * init_bias^2 / 2.
    names = [name for name, _ in model.named_parameters()]
    assert any(name.endswith("bias") for name in names)
    assert l2_penalty(params, 0.0) == 0.0


def test_l2_gradient_in_place_equals_differentiating_the_penalty():
    """The training step adds weight_decay * p to p.grad after backward() instead of
    differentiating the penalty in the loss: the same gradients, before clipping."""
    model = build_model({**defaults(), "hidden_size": 8, "depth": 2}, vocab_size=5)
    params = list(model.parameters())
    tokens = torch.randint(0, 5, (3, 4))
    model.train()

    def loss():
        torch.manual_seed(0)  # the same dropout masks both times
        logits, _ = model(tokens, model.initial_state(3))
        return sequence_loss(logits, tokens)

    model.zero_grad(set_to_none=True)
    (loss() + 0.05 * 0.5 * sum(p.pow(2).sum() for p in params)).backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    loss().backward()
    add_l2_gradient(params, 0.05)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7)
    unused = torch.nn.Parameter(torch.ones(2))  # no gradient yet: just the penalty's
    add_l2_gradient([unused], 0.05)
    assert unused.grad.tolist() == pytest.approx([0.05, 0.05])


@pytest.mark.parametrize(
    ("epoch_1based", "lr_decay", "max_epoch", "expected"),
    [
        (1, 1.02, 20, 0.2),
        (20, 1.02, 20, 0.2),
        (21, 1.02, 20, 0.19608),
        (22, 1.02, 20, 0.19223),
        (100, 1.02, 20, 0.04102),
        (500, 1.02, 20, 1.49e-5),
        (6, 1.03, 5, 0.19417),
        (50, 1.03, 5, 0.05289),
        (100, 1.03, 5, 0.01206),
    ],
)
def test_learning_rate_schedule_matches_the_reference_values(
    epoch_1based, lr_decay, max_epoch, expected
):
    lr = learning_rate_at(epoch_1based - 1, 0.2, lr_decay, max_epoch)
    assert lr == pytest.approx(expected, rel=2e-3)


def small_config(**changes):
    config = {
        **defaults(),
        "hidden_size": 6,
        "depth": 2,
        "batch_size": 2,
        "num_steps": 3,
        "seed": 0,
        "device": "cpu",
    }
    config.update(changes)
    return config


def test_one_training_step_is_clipped_sgd_on_loss_plus_l2():
    """Replay the first minibatch by hand: loss + wd*sum(p^2)/2, global clip, p -= lr*g."""
    config = small_config(max_grad_norm=0.05, weight_decay=0.01, learning_rate=0.7)
    tokens = np.random.default_rng(0).integers(0, 5, size=2 * 4)  # exactly one minibatch
    corpus = Corpus("toy", tokens, tokens, tokens, vocab=list("abcde"))
    torch.manual_seed(0)
    trainer = Trainer(config, corpus, Recorder(), RunContext(echo=lambda _: None))
    reference = copy.deepcopy(trainer.model)
    trainer.train_epoch(lr=0.7)
    model = trainer.model

    rows = tokens.reshape(2, 4)
    x, y = torch.as_tensor(rows[:, :3]), torch.as_tensor(rows[:, 1:])
    reference.train()
    logits, _ = reference(x, reference.initial_state(2))
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 5), y.reshape(-1), reduction="none"
    )
    params = list(reference.parameters())
    cost = per_token.sum() / 2 + 0.01 * sum((p**2).sum() for p in params) / 2
    grads = torch.autograd.grad(cost, params)
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    scale = min(1.0, 0.05 / norm)
    assert scale < 1.0  # the clip is active in this test
    for p_ref, g, p_new in zip(params, grads, model.parameters(), strict=True):
        assert torch.allclose(p_ref - 0.7 * scale * g, p_new, atol=1e-6)


def quiet(_message: str) -> None:
    pass


def test_a_training_step_reports_its_cost_tokens_gradient_norm_and_state():
    """train_step on the first minibatch, against autograd on a copy of the model: the
    cost (loss + L2 term), the targets counted, the gradient norm before clipping, the
    hidden state it leaves, and the clipped SGD step it takes."""
    config = small_config(max_grad_norm=0.05, weight_decay=0.01, learning_rate=0.7)
    tokens = np.random.default_rng(3).integers(0, 5, size=2 * 4)
    corpus = Corpus("toy", tokens, tokens, tokens, vocab=list("abcde"))
    torch.manual_seed(0)
    trainer = Trainer(config, corpus, Recorder(), RunContext(echo=quiet))
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.7
    reference = copy.deepcopy(trainer.model)
    rows = tokens.reshape(2, 4)
    trainer.model.train()
    result = trainer.train_step(rows[:, :3], rows[:, 1:])

    reference.train()
    logits, state = reference(torch.as_tensor(rows[:, :3]), reference.initial_state(2))
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 5), torch.as_tensor(rows[:, 1:]).reshape(-1), reduction="sum"
    )
    params = list(reference.parameters())
    l2 = 0.01 * sum((p.double() ** 2).sum() for p in params) / 2
    cost = nll / 2 + l2
    grads = torch.autograd.grad(cost, params)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert (result.rows, result.tokens) == (2, 6)
    assert result.cost == pytest.approx(cost.item(), rel=1e-6)
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    torch.testing.assert_close(result.state, state.detach(), rtol=1e-6, atol=1e-7)
    assert not result.state.requires_grad  # carried to the next minibatch without a graph
    scale = 0.05 / norm
    for p_ref, g, p_new in zip(params, grads, trainer.model.parameters(), strict=True):
        assert torch.allclose(p_ref - 0.7 * scale * g, p_new, atol=1e-6)


def test_divergence_stops_training_with_epoch_and_step():
    corpus = Corpus(
        "toy",
        *(np.random.default_rng(i).integers(0, 5, 400) for i in range(3)),
        vocab=list("abcde"),
    )
    config = small_config(learning_rate=float("1e30"), max_grad_norm=1e30, max_max_epoch=3)
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+/\d+.*learning_rate"):
        train(config, corpus, Recorder(), RunContext(echo=lambda _: None))


def test_train_records_reference_info_and_metrics_per_epoch():
    corpus = Corpus(
        "toy",
        *(np.random.default_rng(i).integers(0, 5, 400) for i in range(3)),
        vocab=list("abcde"),
    )
    recorder = Recorder()
    torch.manual_seed(0)
    summary = train(small_config(max_max_epoch=3), corpus, recorder, RunContext(echo=quiet))
    valid = [v for _, v in recorder.scalars["valid.ppl"]]
    assert [s for s, _ in recorder.scalars["valid.ppl"]] == [1, 2, 3]
    assert summary.best_valid_ppl == min(valid)
    assert summary.best_epoch == valid.index(min(valid)) + 1
    bits = [v for _, v in recorder.scalars["valid.bpc"]]
    assert bits == pytest.approx([math.log2(p) for p in valid])
    info = recorder.info
    assert info["nr_parameters"] == sum(
        p.numel() for p in build_model(small_config(), 5).parameters()
    )
    assert info["epoch_nr"] == 3 and info["best_val_epoch"] == summary.best_epoch
    assert info["logs"]["valid_perplexity"] == valid
