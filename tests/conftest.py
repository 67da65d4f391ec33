"""Shared test helpers. Every test runs on CPU in fp32 with small random weights, no network."""

import json

import pytest
import torch

# Parity tolerance: the issue asks for every module to match its reference within 1e-5 in fp32.
ATOL = 1e-5


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1):
    """Fill every parameter (norms, relative-position tables and SAM's alpha included) with random values, so that
    no parity test passes because a weight happens to be zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def write_swapped_tokenizer(tokenizer_json: str, path):
    """A tokenizer.json of the same size as the one given (its text), with the ids of two tokens swapped: the same
    text becomes other ids, which only a comparison of the tokenizers can tell."""
    other = json.loads(tokenizer_json)
    vocab, added = other["model"]["vocab"], {t["content"] for t in other["added_tokens"]}
    a, b = [t for t in vocab if len(t) > 2 and t not in added][:2]  # (an added token's id is the vocab's: kept)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(other, ensure_ascii=False))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
