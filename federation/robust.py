"""Poisoning defences applied before any strategy sees the updates: the distance screen."""

import math

import numpy as np


def distance(arrays: list[np.ndarray], weights: list[np.ndarray], mask: tuple[bool, ...]) -> float:
    """L2 distance between a client's model and the global one, over the trained weights only."""
    return math.sqrt(sum(float(np.sum((a.astype(np.float64) - w) ** 2)) for a, w, m in zip(arrays, weights, mask) if m))


def distance_screen(distances: list[float], max_update_norm: float, screen_factor: float) -> list[str | None]:
    """Why each update is too far from the global model (None: it is not): over the bound, or with 3+
    updates over screen_factor times the round's median distance."""
    median = float(np.median(distances)) if len(distances) >= 3 else 0.0
    reasons: list[str | None] = []
    for d in distances:
        why = None
        if max_update_norm and d > max_update_norm:
            why = f"over --max-update-norm {max_update_norm:g}"
        elif screen_factor and median > 0 and d > screen_factor * median:
            why = f"over --screen-factor {screen_factor:g} x the round's median {median:.3g}"
        reasons.append(why)
    return reasons
