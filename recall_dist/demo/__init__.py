"""The demos, on one skeleton (``pipeline``: a ``Recipe`` run as prepare -> fine-tunes -> sweep -> report;
``stages``: one torchrun stage; ``verdicts``: tolerances and verdicts; ``markdown``: the summary's skeleton):
``recall-dist demo`` (runner, grid, report: a tiny Llama on a known sparse task) and ``recall-dist demo-text``
(fortunes, fortunes_report: a pretrained LM on human text); their configs in ``configs/``."""
