"""The demos: ``recall-dist demo`` (runner, grid, report: a tiny Llama on a known sparse task) and
``recall-dist demo-text`` (text, text_report: a pretrained LM on human text); their configs in ``configs/``."""
