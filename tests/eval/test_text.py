"""k-NN Precision/Recall/Density/Coverage on synthetic embeddings with known answers, the PCA
step, the two encoders, and a text-metric sweep on a tiny Llama."""

import contextlib
import io
import json

import numpy as np
import pytest

from recall_dist.configtree import from_dict
from recall_dist.data import CharTokenizer, build_task
from recall_dist.eval import SweepConfig, run_sweep, text
from tests.eval.models import random_llama, save


def _cluster(rng, n, direction, spread=0.3, dim=8):
    center = np.zeros(dim)
    center[direction] = 10.0
    return center + spread * rng.standard_normal((n, dim))


def test_identical_sets_score_one():
    real = _cluster(np.random.default_rng(0), 200, 0, spread=3.0)
    out = text.knn_precision_recall(real, real.copy(), k=4)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


def test_disjoint_far_clusters_score_zero():
    rng = np.random.default_rng(1)
    out = text.knn_precision_recall(_cluster(rng, 200, 0), _cluster(rng, 200, 1), k=4)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_model_covering_a_subset_has_high_precision_low_recall():
    rng = np.random.default_rng(2)
    real = _cluster(rng, 400, 0, spread=3.0)
    # Generations: copies (with small noise) of the 10% of references with the largest coordinate 1.
    corner = real[np.argsort(real[:, 1])[-40:]]
    fake = corner[rng.integers(0, 40, 400)] + 0.01 * rng.standard_normal((400, 8))
    out = text.knn_precision_recall(real, fake, k=4)
    assert out["precision"] > 0.9 and out["recall"] < 0.3, out
    swapped = text.knn_precision_recall(fake, real, k=4)  # the other way round: a diverse, imprecise model
    assert swapped["precision"] < 0.3 and swapped["recall"] > 0.9, swapped


def test_pca_keeps_the_requested_variance():
    rng = np.random.default_rng(3)
    # After L2-normalisation nearly all variance lies in the two noise directions of size 3 and 2.
    base = np.zeros((300, 6))
    base[:, 0] = 10.0
    base[:, 1] = 3.0 * rng.standard_normal(300)
    base[:, 2] = 2.0 * rng.standard_normal(300)
    base[:, 3:] = 0.01 * rng.standard_normal((300, 3))
    real, fake = text.pca_project(base[:150], base[150:], explained_variance=0.9)
    assert real.shape == (150, 2) and fake.shape == (150, 2)
    assert text.pca_project(base[:150], base[150:], explained_variance=1.0)[0].shape[1] >= 5


def test_duplicated_references_warn():
    rng = np.random.default_rng(4)
    real = np.repeat(_cluster(rng, 10, 0, spread=3.0), 10, axis=0)  # 10 distinct points, 10 copies each
    with pytest.warns(UserWarning, match="zero k-NN radius"):
        out = text.knn_precision_recall(real, real.copy(), k=4)
    assert out["precision"] == 0.0  # the degeneracy the warning is about


def test_bad_inputs():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="equal-sized"):
        text.knn_precision_recall(x, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="more than k"):
        text.knn_precision_recall(x[:4], x[:4], k=4)
    with pytest.raises(ValueError, match="same d"):
        text.knn_precision_recall(x, np.zeros((10, 4)))


def test_hidden_state_encoder_ignores_padding():
    tok = CharTokenizer(build_task("product").alphabet)
    enc = text.HiddenStateEncoder(random_llama(tok.vocab_size, 0), tok, batch_size=8)
    together = enc.encode(["12", "345678"])
    alone = enc.encode(["12"])
    assert together.shape == (2, 32)
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_sentence_transformer_encoder_offline():
    enc = text.SentenceTransformerEncoder()  # bundled all-MiniLM-L6-v2, HF_HUB_OFFLINE=1 in conftest
    e = enc.encode(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply."])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


@pytest.mark.parametrize("encoder", ["lm", "sentence-transformers"])
def test_text_sweep(tmp_path, encoder):
    tok = CharTokenizer(build_task("product").alphabet)
    path = save(random_llama(tok.vocab_size, 0), tok, tmp_path / "m")
    cfg = {
        "models": [{"name": "tiny", "path": str(path)}],
        "task": "product",
        "task_params": {"max_factor": 9},
        "metric": "text",
        "temperatures": [0.5, 1.5],
        "output_dir": str(tmp_path / "out"),
        "text": {"num_texts": 24, "chunk_size": 10, "encoder": encoder},
    }
    result = run_sweep(from_dict(SweepConfig, cfg), rank=0, world_size=1)
    assert [r["temperature"] for r in result["rows"]] == [0.5, 1.5]
    for r in result["rows"]:
        assert r["num_texts"] == 24 and all(0 <= r[k] <= 1 for k in ("precision", "recall", "coverage"))
    assert (tmp_path / "out" / "sweep.csv").read_text().startswith("model,temperature,precision,recall,density")
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["metric"] == "text"
    assert (tmp_path / "out" / "pr_curve.png").is_file()


@pytest.mark.parametrize("explained_variance", [None, 0.9])
def test_counts_divided_once_are_prdc(explained_variance):
    """``knn_counts`` / ``normalisers`` equal ``prdc.compute_prdc`` exactly (on the same PCA
    projection), including exact duplicates between the sets (ties at a ball's radius)."""
    from prdc import compute_prdc

    rng = np.random.default_rng(5)
    real = _cluster(rng, 120, 0, spread=2.0)
    fake = np.vstack([real[:30], _cluster(rng, 90, 1, spread=2.0)])  # 30 exact copies of references
    counts = text.knn_counts(real, fake, k=4, explained_variance=explained_variance)
    assert all(isinstance(v, int) for v in counts.values())
    if explained_variance is not None:
        real, fake = text.pca_project(real, fake, explained_variance)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = compute_prdc(real, fake, nearest_k=4)
    norm = text.normalisers(len(real), len(fake), 4)
    assert {name: counts[name] / norm[name] for name in text.KNN_COUNTS} == pytest.approx(expected, abs=0, rel=0)
    assert 0 < counts["precision"] < len(fake) and counts["density"] >= counts["precision"]


def _text_sweep_on_every_rank(cfg_dict):
    run_sweep(from_dict(SweepConfig, cfg_dict))


@pytest.mark.slow
def test_text_sweep_spread_over_ranks_gives_the_same_table(tmp_path):
    """Generation + embedding in the shards and the k-NN counting in one part per rank: 1 and 2
    gloo processes write identical tables, and the 2-process run leaves one part file per rank."""
    from recall_dist.distributed.testing import run_distributed_test

    tok = CharTokenizer(build_task("product").alphabet)
    models = [
        {"name": name, "path": str(save(random_llama(tok.vocab_size, seed), tok, tmp_path / name))}
        for name, seed in (("a", 0), ("b", 1))
    ]
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        cfg = {
            "models": models,
            "task": "product",
            "task_params": {"max_factor": 9},
            "metric": "text",
            "temperatures": [0.5, 1.5],
            "output_dir": str(out),
            "text": {"num_texts": 30, "chunk_size": 8, "encoder": "lm"},
        }
        run_distributed_test(_text_sweep_on_every_rank, world, cfg)
        parts = sorted(p.name for p in (out / "shards").glob("text-part-*.json"))
        assert parts == [f"text-part-{p:05d}-of-{world:05d}.json" for p in range(world)]
        outputs[world] = {name: (out / name).read_text() for name in ("sweep.csv", "sweep.json")}
    assert outputs[1] == outputs[2]
    rows = json.loads(outputs[1]["sweep.json"])["rows"]
    assert [(r["model"], r["temperature"]) for r in rows] == [("a", 0.5), ("a", 1.5), ("b", 0.5), ("b", 1.5)]
