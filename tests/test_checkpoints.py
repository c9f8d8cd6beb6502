"""Checkpoint files: every RNG state round-trips, and loading never needs pickle."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from pipeline.train import checkpoints


def _draws(noise: torch.Generator) -> tuple:
    return (
        torch.rand(3).tolist(),
        torch.randn(3, generator=noise).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
    )


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    noise = torch.Generator().manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gauss_next: part of python's state
    np.random.randn()
    augment = torch.Generator().manual_seed(9)
    other_rank = checkpoints.capture_rng(torch.Generator().manual_seed(8),
                                         torch.Generator().manual_seed(10))
    saved = checkpoints.capture_rng(noise, augment)
    state = {key: None for key in checkpoints.REQUIRED_KEYS} | {
        "format": checkpoints.FORMAT_VERSION,
        "rng": checkpoints.stack_ranks([other_rank, saved]),  # this process plays rank 1
    }
    checkpoints.save_state(state, tmp_path)
    expected = _draws(noise)
    expected_augment = torch.rand(4, generator=augment).tolist()

    loaded = checkpoints.load_state(tmp_path)  # weights_only=True inside
    fresh = torch.Generator().manual_seed(123)
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    fresh_augment = torch.Generator().manual_seed(321)
    checkpoints.restore_rng(checkpoints.rank_row(loaded["rng"], 1), fresh, fresh_augment)
    assert _draws(fresh) == expected
    assert torch.rand(4, generator=fresh_augment).tolist() == expected_augment


def test_a_file_that_needs_pickle_is_refused(tmp_path):
    # Any class outside torch's allow-list needs pickle's code execution to load.
    torch.save({"format": 1, "payload": argparse.Namespace(x=1)}, tmp_path / checkpoints.STATE_FILE)
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        checkpoints.load_state(tmp_path)


def test_an_incomplete_checkpoint_is_named(tmp_path):
    torch.save({"format": 1, "step": 3}, tmp_path / checkpoints.STATE_FILE)
    with pytest.raises(ValueError, match="missing generator"):
        checkpoints.load_state(tmp_path)
