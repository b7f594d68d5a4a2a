"""Functions the CLI seed tests (tests/test_cli_seed.py) enqueue RQ's way."""

from __future__ import annotations


def count_words(text: str) -> int:
    """RQ's first example, without the network: the number of words in `text`."""
    return len(text.split())
