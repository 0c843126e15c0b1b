"""Shared cases for the kernel tests: every rule and option, as (name, params) pairs."""

RULE_CASES = [
    ("nll", {}),
    ("cdiv", {"alpha": 1.4}),
    ("cdiv", {"alpha": 0.7}),
    ("lambda_pr", {"lam": 0.08}),
    ("truncr", {"drop": 0.5, "granularity": "sequence", "min_count": 1, "buffer_size": 64}),
    ("truncp", {"drop": 0.3, "granularity": "token", "min_count": 1, "buffer_size": 64}),
    ("cdiv", {"alpha": 2.0, "nll_mix": 0.25}),
    ("cdiv", {"alpha": 2.0, "max_weight": 40.0}),
    ("lambda_pr", {"lam": 0.05, "normalize": "tokens"}),
]


def case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())
