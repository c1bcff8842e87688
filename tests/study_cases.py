"""Numbers that the studies' verdict tests feed: per-seed 0/1 vectors of which validation
samples a model gets wrong, paired (shared draws, nested sets) or noisy."""

import numpy as np


def draws(samples=2000, seeds=3, independent=False):
    """Per seed, uniform draws deciding which samples a model gets wrong: a model with error
    rate r errs where the draw is below r. Shared draws pair the models (as two models on one
    validation set are); ``independent`` draws give each call its own (noisy differences)."""
    rngs = [np.random.default_rng(s) for s in range(seeds)]
    shared = [r.random(samples) for r in rngs]

    def wrong(rate):
        us = [r.random(samples) for r in rngs] if independent else shared
        return [u < rate / 100 for u in us]

    return wrong


def errs(rate, n=200, seeds=3, shift=0):
    """(seeds, n) 0/1 errors: the first ``rate`` % of the samples (rotated by ``shift``) wrong.
    Nested sets (shift 0) give a narrow paired interval; ``n`` small and shifted sets a wide
    one."""
    row = np.zeros(n, dtype=bool)
    row[: int(round(rate / 100 * n))] = True
    return np.tile(np.roll(row, shift), (seeds, 1))
