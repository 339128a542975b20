"""NEFTune noise on the input embeddings (adapters/training/sft.py `EmbeddingNoise`)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.training.config import Hyperparameters
from adapters.training.sft import EmbeddingNoise


@pytest.fixture
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def test_noise_only_in_training_with_gradients_and_bounded(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 64, (3, 10))
    embed = model.get_input_embeddings()
    clean = embed(ids).detach()
    noise = EmbeddingNoise(model, alpha=5.0)
    noise.length = 10

    model.train()
    noisy = embed(ids)
    bound = 5.0 / math.sqrt(10 * 32)
    diff = (noisy - clean).abs()
    assert diff.max() <= bound + 1e-6
    assert diff.mean() > bound / 4  # uniform on [-bound, bound]: mean |x| is bound / 2

    with torch.no_grad():  # the base-model pass of KL replay runs without gradients
        assert torch.equal(embed(ids), clean)
    model.eval()  # validation
    assert torch.equal(embed(ids), clean)

    noise.handle.remove()
    model.train()
    assert torch.equal(embed(ids), clean)


def test_alpha_is_validated() -> None:
    assert Hyperparameters(neftune_noise_alpha=5).neftune_noise_alpha == 5
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        Hyperparameters(neftune_noise_alpha=-1)
