"""DAPO's overlong reward shaping (soft punishment of responses near the length limit)."""
from __future__ import annotations


def overlong_penalty(response_length: int, *, max_response_length: int, buffer_len: int,
                     penalty_factor: float) -> float:
    """0 up to `max_response_length - buffer_len` tokens, then linear down to `-penalty_factor`
    at `max_response_length`; added to the correctness reward.

    As DAPO/verl: expected = max_len - buffer; penalty = min(-(L - expected) / buffer * factor, 0).
    """
    expected = max_response_length - buffer_len
    return min(-(response_length - expected) / buffer_len * penalty_factor, 0.0)
