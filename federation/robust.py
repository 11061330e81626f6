"""The poisoning defence every strategy sits behind: the consensus screen, and a bound on any update's size.

With 3 or more updates in a round, the consensus is their geometric median g (Weiszfeld's algorithm,
as RFA uses it: Pillutla et al. 2019), taken over the trained weights' changes. An update pointing away
from it (cosine with g under `min_cosine`) is rejected; every other update farther from g than
`clip_factor` times the round's median distance is pulled back onto that sphere (centered clipping,
Karimireddy et al. 2021, around g). At the default factor of 1 the farther half of the updates is pulled
in every round: a boosted update keeps no more pull than the median honest one. With fewer than 3
updates there is no consensus to judge by: only the size bound applies; with fewer than 3 left after
the direction rule, nothing is clipped.

`nnm` adds nearest-neighbour mixing (Allouah et al., AISTATS 2023; byzfl's NNM) after the direction rule:
each kept update becomes the mean of its n - f nearest kept updates (f: --num-malicious, 1 at least, and
under half of them), which shrinks a far minority's pull by about n - f times, before centered clipping of
the mixed updates.
"""

import math
from dataclasses import dataclass

import numpy as np

SCREENS = ("consensus", "nnm", "none")
# The defaults, shared by the server's flags and by attacks.py, which is told them as a README reader would be
MIN_COSINE = -0.1  # honest updates on Dirichlet(0.5) shares were measured down to -0.05
CLIP_FACTOR = 1.0  # chosen by its worst case over bench.py robustness's suite (README: the consensus screen)
MAX_UPDATE_NORM = 10.0  # a first-round honest update of the tutorial's CNN moves it 1-2% of its norm
FAR = 2.0  # an update clipped from farther than this many median distances is logged as a warning: honest
# ones in the benchmark's label-skewed runs stayed within it, so one beyond it is worth a look


@dataclass
class Verdict:
    """What the screen decided for one update: `why` it was rejected (None: kept), and its arrays when clipped."""

    why: str | None = None
    arrays: list[np.ndarray] | None = None
    note: str | None = None  # a kept update that was clipped says by how much; one mixed by NNM has no note
    ratio: float = 0.0  # a clipped update's distance from the consensus over the round's median distance


def change(arrays: list[np.ndarray], weights: list[np.ndarray], mask: tuple[bool, ...]) -> np.ndarray:
    """An update's change of the trained weights, flattened to one float64 vector."""
    parts = [(a.astype(np.float64) - w).ravel() for a, w, m in zip(arrays, weights, mask) if m]
    return np.concatenate(parts) if parts else np.zeros(0)


def norm(arrays: list[np.ndarray], mask: tuple[bool, ...]) -> float:
    """L2 norm of the trained weights."""
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a, m in zip(arrays, mask) if m))


def size_bound(weights: list[np.ndarray], mask: tuple[bool, ...], max_update_norm: float) -> float:
    """How far one update may move the model: --max-update-norm x the global model's norm (0: no bound)."""
    return max_update_norm * norm(weights, mask)


def geometric_median(points: np.ndarray, iterations: int = 100, tolerance: float = 1e-7) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to the rows of `points` (Weiszfeld)."""
    z = np.median(points, axis=0)
    for _ in range(iterations):
        d = np.maximum(np.linalg.norm(points - z, axis=1), 1e-12)
        new = (points / d[:, None]).sum(axis=0) / (1 / d).sum()
        if np.linalg.norm(new - z) <= tolerance * max(np.linalg.norm(z), 1e-12):
            return new
        z = new
    return z


def nearest_neighbour_mixing(points: np.ndarray, f: int) -> np.ndarray:
    """Each row replaced by the mean of its n - f nearest rows, itself included: byzfl's NNM (Allouah et al.
    2023), the same numbers bit for bit, a row at a time (byzfl's holds n x (n - f) copies of the model)."""
    from scipy.spatial.distance import cdist  # byzfl's distances (scipy comes with byzfl); here: a 1 s import

    k = len(points) - f
    nearest = np.argpartition(cdist(points, points), k - 1, axis=1)[:, :k]
    return np.stack([points[rows].mean(axis=0) for rows in nearest])


def screen(
    updates: list[list[np.ndarray]],
    weights: list[np.ndarray],
    mask: tuple[bool, ...],
    method: str = "consensus",
    clip_factor: float = CLIP_FACTOR,
    max_update_norm: float = MAX_UPDATE_NORM,
    min_cosine: float = MIN_COSINE,
    num_malicious: int = 0,
) -> list[Verdict]:
    """The verdict on each update of a round (arrays in the model's order) against the global `weights`.

    A model whose weights are all zero gives the size bound no scale: it is then not applied."""
    bound = size_bound(weights, mask, max_update_norm) or math.inf
    verdicts = [Verdict() for _ in updates]
    deltas = [change(a, weights, mask) for a in updates]
    for v, d in zip(verdicts, deltas):
        size = float(np.linalg.norm(d))
        if max_update_norm and size > bound:
            v.why = (f"it moves the model {size:.3g}, over --max-update-norm {max_update_norm:g} x the global "
                     f"model's norm ({bound:.3g})")  # fmt: skip
    live = [i for i, v in enumerate(verdicts) if v.why is None]
    if method == "none" or len(live) < 3:
        return verdicts
    points = np.stack([deltas[i] for i in live])
    g = geometric_median(points)
    g_norm = float(np.linalg.norm(g))
    distance = np.linalg.norm(points - g, axis=1)
    kept = []
    for row, i in enumerate(live):
        cosine = float(points[row] @ g) / max(float(np.linalg.norm(points[row])) * g_norm, 1e-12)
        if cosine < min_cosine:
            verdicts[
                i
            ].why = f"it points away from the round's consensus (cosine {cosine:.2f} with its geometric median, under --min-cosine {min_cosine:g})"
        else:
            kept.append(row)
    if method == "nnm" and len(kept) >= 3:
        f = min(max(1, num_malicious), (len(kept) - 1) // 2)  # NNM's guarantee needs f under half the updates
        points[kept] = nearest_neighbour_mixing(points[kept], f)
        for row in kept:
            verdicts[live[row]].arrays = apply_change(points[row], updates[live[row]], weights, mask)
        g = geometric_median(points[kept])
        distance = np.linalg.norm(points - g, axis=1)
    if not clip_factor or len(kept) < 3:  # two left: the median distance of two would clip one to their mean
        return verdicts
    median = float(np.median(distance[kept]))
    radius = clip_factor * median
    for row in kept:
        if distance[row] > radius and distance[row] > 0:
            i = live[row]
            clipped = g + (points[row] - g) * (radius / distance[row])
            verdicts[i].arrays = apply_change(clipped, updates[i], weights, mask)
            verdicts[i].ratio = float(distance[row]) / median if median > 0 else math.inf
            verdicts[i].note = (f"clipped to --clip-factor {clip_factor:g} x the median distance from the "
                                f"consensus (it was {verdicts[i].ratio:.1f} x)")  # fmt: skip
    return verdicts


def apply_change(delta: np.ndarray, arrays: list[np.ndarray], weights: list[np.ndarray], mask) -> list[np.ndarray]:
    """The global weights plus a flattened change of the trained ones; other arrays as the client sent them."""
    out, at = [], 0
    for a, w, m in zip(arrays, weights, mask):
        if m:
            out.append((w + delta[at : at + w.size].reshape(w.shape)).astype(a.dtype))
            at += w.size
        else:
            out.append(a)
    return out
