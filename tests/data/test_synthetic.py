import math
from collections import Counter

import pytest

from recall_dist.data.synthetic import KnownSupportTask, ProductConditionalTask, ProductTask, build_task, known_tasks


def brute_force_product(max_factor):
    counts = {}
    for a in range(1, max_factor + 1):
        for b in range(1, max_factor + 1):
            counts[str(a * b)] = counts.get(str(a * b), 0) + 1
    return {x: c / max_factor**2 for x, c in counts.items()}


def assert_counts_match(samples, distribution, n):
    """Every completion is in the support and its count lies within 4 sigma of n P(x)."""
    counts = Counter(samples)
    assert set(counts) <= set(distribution)
    for x, p in distribution.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts.get(x, 0) - n * p) <= 4 * sigma + 1, (x, counts.get(x, 0), n * p)


@pytest.mark.parametrize("max_factor", [1, 2, 7, 30])
def test_product_distribution_matches_brute_force(max_factor):
    task = ProductTask(max_factor)
    dist = task.target_distribution("")
    assert task.prompts() == [""]
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-12)
    expected = brute_force_product(max_factor)
    assert dist.keys() == expected.keys()
    for x in expected:
        assert math.isclose(dist[x], expected[x], rel_tol=1e-12)
    assert task.max_completion_chars == max(len(x) for x in dist)


def test_product_30_support_is_sparse():
    dist = ProductTask(30).target_distribution("")
    assert len(dist) == 308 and dist["1"] == 1 / 900 and dist["12"] == 6 / 900


def test_product_samples_follow_distribution_and_alphabet():
    task = build_task("product", max_factor=6)
    n = 20000
    samples = task.sample(n, seed=3)
    assert all(s["prompt"] == "" for s in samples)
    assert all(set(s["completion"]) <= set(task.alphabet) for s in samples)
    assert_counts_match([s["completion"] for s in samples], task.target_distribution(""), n)


def test_conditional_distribution_and_samples():
    task = build_task("product_conditional", max_factor=5)
    assert task.prompts() == ["1*", "2*", "3*", "4*", "5*"]
    assert math.isclose(sum(task.prompt_distribution().values()), 1.0)
    for prompt in task.prompts():
        a = int(prompt[:-1])
        dist = task.target_distribution(prompt)
        assert dist == {str(a * b): 1 / 5 for b in range(1, 6)}
        assert math.isclose(sum(dist.values()), 1.0)
    n = 20000
    samples = task.sample(n, seed=11)
    prompt_counts = Counter(s["prompt"] for s in samples)
    assert_counts_match([s["prompt"] for s in samples], task.prompt_distribution(), n)
    for prompt in task.prompts():
        completions = [s["completion"] for s in samples if s["prompt"] == prompt]
        assert_counts_match(completions, task.target_distribution(prompt), prompt_counts[prompt])
    assert all(set(s["prompt"] + s["completion"]) <= set(task.alphabet) for s in samples)
    assert task.max_completion_chars == 2


@pytest.mark.parametrize("name", ["product", "product_conditional"])
def test_sampling_is_deterministic_in_seed(name):
    task = build_task(name, max_factor=9)
    assert isinstance(task, KnownSupportTask)
    assert task.sample(50, seed=1) == build_task(name, max_factor=9).sample(50, seed=1)
    assert task.sample(50, seed=1) != task.sample(50, seed=2)
    assert task.sample(0, seed=1) == []


def test_registry_errors_name_the_problem():
    assert {"product", "product_conditional"} <= set(known_tasks())
    with pytest.raises(ValueError, match=r"'prodcut'.*product, product_conditional"):
        build_task("prodcut")
    with pytest.raises(ValueError, match="max_factor = 0"):
        build_task("product", max_factor=0)
    with pytest.raises(ValueError, match=r"max_factor = 2.5"):
        build_task("product_conditional", max_factor=2.5)
    with pytest.raises(ValueError, match=r"max_fator: unknown parameter.*max_factor"):
        build_task("product", max_fator=3)


def test_bad_prompts_are_rejected():
    with pytest.raises(ValueError, match="unconditional"):
        ProductTask(3).target_distribution("2*")
    task = ProductConditionalTask(3)
    for bad in ["", "4*", "0*", "02*", "2", "x*"]:
        with pytest.raises(ValueError, match="expects '<a>\\*'"):
            task.target_distribution(bad)
