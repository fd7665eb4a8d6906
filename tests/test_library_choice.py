"""MKL or oneDNN for the RHN's weight-gradient products (rhn_cli.kernels.library_choice):
decided once per machine and setup, on disk, so that a run's numbers do not depend on
which library happened to time faster in its process; pinned on resume.

Every test uses its own decision cache through RHN_CACHE_DIR, which the native loop's
build (rhn_cli.kernels.native, in the user cache) ignores: no test rebuilds it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from rhn_cli.kernels import library_choice, native, onednn, weight_gradient
from rhn_cli.kernels.library_choice import library_decisions, pin_library_decisions

PRODUCT = "weight_gradient 40x64 64x20 float32"  # of _operands()

pytestmark = pytest.mark.skipif(
    not onednn.applies(torch.float32), reason="no oneDNN in this torch: MKL only"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The decision cache file, in an empty directory, for this test and the processes it
    starts; this process has decided nothing yet."""
    monkeypatch.setenv("RHN_CACHE_DIR", str(tmp_path / "cache"))
    library_choice.forget_decisions()
    assert native.load() is not None, "the native kernels could not be built"
    yield tmp_path / "cache" / library_choice.CACHE_FILE
    library_choice.forget_decisions()  # none of this cache's decisions outlive the test


def _operands():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 64, 40, generator=gen), torch.randn(3, 64, 20, generator=gen)


def _timing_returns(monkeypatch, library):
    """The timing rigged to find ``library`` faster; the list of its calls."""
    calls = []
    monkeypatch.setattr(weight_gradient, "timed_library", lambda *a: calls.append(a) or library)
    return calls


# One process's decision for _operands(): with timing rigged to answer 'mkl' or 'onednn'
# (its first argument), or left alone ('-').
DECIDE = """
import sys
import torch
from rhn_cli.kernels import weight_gradient
if sys.argv[1] != "-":
    weight_gradient.timed_library = lambda *a: sys.argv[1]
gen = torch.Generator().manual_seed(0)
lefts, rights = torch.randn(3, 64, 40, generator=gen), torch.randn(3, 64, 20, generator=gen)
print("onednn" if weight_gradient.through_onednn(lefts, rights) else "mkl")
"""


def _decide_in_a_new_process(timing="-", cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["RHN_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", DECIDE, timing], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_later_process_uses_the_cached_decision_whatever_its_own_timing_says(cache):
    first = _decide_in_a_new_process()  # timed for real, and cached
    opposite = {"mkl": "onednn", "onednn": "mkl"}[first]
    assert list(json.loads(cache.read_text()).values()) == [{PRODUCT: first}]
    assert _decide_in_a_new_process(opposite) == first
    # The rigged timing does decide where nothing is cached: the check above can fail.
    assert _decide_in_a_new_process(opposite, cache.parent / "other") == opposite


def test_pinned_decisions_override_the_cache_and_timing(cache, monkeypatch):
    lefts, rights = _operands()
    _timing_returns(monkeypatch, "mkl")
    assert not weight_gradient.through_onednn(lefts, rights)
    assert library_decisions() == {PRODUCT: "mkl"}
    timings = _timing_returns(monkeypatch, "mkl")
    pin_library_decisions({PRODUCT: "onednn"})  # recorded by the run being resumed
    assert weight_gradient.through_onednn(lefts, rights)
    cache.unlink()  # nor does a deleted cache matter
    library_choice.forget_decisions()  # a new process of the resumed run: pinned again
    pin_library_decisions({PRODUCT: "onednn"})
    assert weight_gradient.through_onednn(lefts, rights)
    assert library_decisions() == {PRODUCT: "onednn"}
    assert not timings and not cache.exists()


def test_a_pin_names_a_known_library(cache):
    with pytest.raises(ValueError, match=f"{PRODUCT}.*'cuBLAS' is not one of mkl, onednn"):
        pin_library_decisions({PRODUCT: "cuBLAS"})
    assert library_decisions() == {}


@pytest.mark.parametrize(
    "contents",
    [b"\x00{not json", b'["a list"]', b'{"AVX2 torch 1 threads 1": "x"}', b"\xff\xfe"],
    ids=["garbage", "list", "bad-entry", "not-utf8"],
)
def test_a_corrupt_cache_file_is_rewritten_not_fatal(cache, monkeypatch, caplog, contents):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(contents)
    lefts, rights = _operands()
    _timing_returns(monkeypatch, "onednn")
    with caplog.at_level("WARNING", logger=library_choice.__name__):
        assert weight_gradient.through_onednn(lefts, rights)
    assert json.loads(cache.read_text())[library_choice.setup()] == {PRODUCT: "onednn"}
    if contents != b'{"AVX2 torch 1 threads 1": "x"}':
        assert "unreadable" in caplog.text or "holds no decisions" in caplog.text


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(cache, monkeypatch, caplog):
    cache.parent.write_text("a file where the cache directory should be")
    timings = _timing_returns(monkeypatch, "onednn")
    with caplog.at_level("WARNING", logger=library_choice.__name__):
        assert library_choice.decide(PRODUCT, weight_gradient.timed_library) == "onednn"
    assert len(timings) == 1 and "timing it for this process only" in caplog.text
    assert library_decisions() == {PRODUCT: "onednn"}


def test_a_cache_entry_holds_for_one_thread_count_and_torch_version(cache, monkeypatch):
    timings = _timing_returns(monkeypatch, "mkl")
    assert library_choice.decide(PRODUCT, weight_gradient.timed_library) == "mkl"
    variations = [(torch, "get_num_threads", lambda: 7), (torch, "__version__", "9.9.9")]
    for module, name, value in variations:
        library_choice.forget_decisions()  # a new process, in another setup
        timings = _timing_returns(monkeypatch, "onednn")
        with monkeypatch.context() as changed:
            changed.setattr(module, name, value)
            assert library_choice.decide(PRODUCT, weight_gradient.timed_library) == "onednn"
        assert len(timings) == 1  # timed afresh, not read from the other setup's entry
    library_choice.forget_decisions()
    assert library_choice.decide(PRODUCT, weight_gradient.timed_library) == "mkl"
    setups = json.loads(cache.read_text())
    assert len(setups) == 3 and all(entry.keys() == {PRODUCT} for entry in setups.values())
    assert any("threads 7" in s for s in setups) and any("torch 9.9.9 " in s for s in setups)


# `rhn train` in this process, with the weight-gradient timing's clock rigged so that any
# library timing finds sys.argv[1] ('mkl' or 'onednn') a second per product faster, as a
# busy machine can make either look; it prints a digest of every weight-gradient product
# the training computed (not the timing's), which differs between the libraries in the
# last bits.
RIGGED_TRAIN = """
import atexit, hashlib, sys, time, types
from rhn_cli.kernels import weight_gradient as wg
favoured, deciding, penalty, digest = sys.argv[1] == "onednn", [False], [0.0], hashlib.sha256()
product, decide = wg.product, wg.through_onednn

def weight_gradient(out, left, right, accumulate, onednn=False):
    if deciding[0] and onednn != favoured:
        penalty[0] += 1.0
    result = product(out, left, right, accumulate, onednn)
    if not deciding[0]:
        digest.update(result.numpy().tobytes())
    return result

def weight_gradients_through_onednn(lefts, rights):
    deciding[0] = True
    try:
        return decide(lefts, rights)
    finally:
        deciding[0] = False

wg.product = weight_gradient
wg.through_onednn = weight_gradients_through_onednn
wg.time = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + penalty[0])
atexit.register(lambda: print("weight-gradient digest", digest.hexdigest()))
from rhn_cli.cli import main
sys.argv = ["rhn", *sys.argv[2:]]
main()
"""
TRAIN = (
    "train --unobserved --seed 7 with hidden_size=64 depth=2 batch_size=20 num_steps=35 "
    "synthetic.train_tokens=5000 synthetic.valid_tokens=2000 synthetic.test_tokens=2000 "
    "max_max_epoch=1"
).split()


def _train(favoured):
    done = subprocess.run(
        [sys.executable, "-c", RIGGED_TRAIN, favoured, *TRAIN], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    numbers = re.findall(r"(?:ppl|bits|\(best valid ppl\))\s+([0-9.]+)", done.stdout)
    assert len(numbers) >= 8, done.stdout
    (digest,) = re.findall(r"weight-gradient digest (\w+)", done.stdout)
    return numbers, digest


@pytest.mark.slow
def test_two_training_processes_whose_timings_disagree_compute_the_same_numbers(cache):
    """Two fresh `rhn train --seed 7` processes sharing a cache: the first times (rigged to
    find oneDNN faster) and caches; the second, whose own timing would pick MKL, reads the
    cache and prints the same perplexities, every weight gradient equal to the last bit."""
    first = _train("onednn")
    decided = json.loads(cache.read_text())[library_choice.setup()]
    assert decided and set(decided.values()) == {"onednn"}
    assert any(key.startswith("weight_gradient 12x") for key in decided)  # the output layer
    assert _train("mkl") == first
