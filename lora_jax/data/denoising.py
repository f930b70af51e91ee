"""BART's text-infilling noise (Lewis et al. 2019, section 2.2), on token ids, in numpy."""

from __future__ import annotations

import numpy as np


def text_infilling(
    ids: list[int] | np.ndarray,
    mask_id: int,
    rng: np.random.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> list[int]:
    """Replaces spans (lengths ~ Poisson(lambda)) covering about `mask_ratio` of the tokens with one `<mask>` each;
    a zero-length span inserts a `<mask>`. Special tokens at the ends (e.g. <s> ... </s>) are kept in place.

    ids: one sequence, including its <s> and </s>. Returns the noised sequence (never longer than the input + 1)."""
    ids = list(ids)
    if len(ids) <= 2:
        return ids
    body = ids[1:-1]
    n = len(body)
    budget = int(round(n * mask_ratio))
    masked = np.zeros(n, bool)
    inserts: set[int] = set()
    tries = 0
    while budget > 0 and tries < 10 * n:
        tries += 1
        span = int(rng.poisson(poisson_lambda))
        start = int(rng.integers(0, n))
        if span == 0:
            inserts.add(start)
            continue
        span = min(span, budget, n - start)
        if masked[start : start + span].any():
            continue
        masked[start : start + span] = True
        budget -= span
    out = [ids[0]]
    i = 0
    while i < n:
        if i in inserts and not masked[i]:
            out.append(mask_id)
        if masked[i]:
            out.append(mask_id)
            while i < n and masked[i]:
                i += 1
            continue
        out.append(body[i])
        i += 1
    out.append(ids[-1])
    return out
