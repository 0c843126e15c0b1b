"""recall_dist/train/export.py, read back by libraries of its own: a tiny random Llama exported in a given
dtype loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and its tensors equal the source's
cast to that dtype (``safetensors`` reads every file); a small shard size gives several files, cut where a
naive greedy packing cuts them, with an index that names the file holding each tensor; tokenizer,
generation config and extra files are published with it; ``writer=False`` consumes the parameters and
writes nothing; an export that fails half-way leaves the previous ``final/`` as it was and the next one
replaces it; ``export_hf`` reads a checkpoint written by ``torch.distributed.checkpoint`` itself.

Also tested elsewhere: a SIGKILL mid-export and a crash between the two renames, and the writer's peak
memory (tests/train/test_scale.py: test_export_atomic, test_export_streams_one_shard_at_a_time); the final
export of a real run equal to ``export_hf`` of its DeepSpeed checkpoint (tests/e2e/test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recall_dist.configtree import load_yaml
from recall_dist.train.config import MODEL_PRESET_DIR
from recall_dist.train.export import INDEX_NAME, export_hf, write_hf_directory
from recall_dist.train.models import build_model
from tests.train.helpers import build, tiny_config_dict


def _tiny_model_section(**config) -> dict:
    model = load_yaml(MODEL_PRESET_DIR / "tiny-llama.yaml")
    model["config"].update(config)
    return model


def _model(seed: int = 0, **config):
    return build_model(build(tiny_config_dict("unused", model=_tiny_model_section(**config))).model, seed=seed)


def _parameters(model):
    return ((name, p.detach()) for name, p in model.named_parameters())


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        part = load_file(path)
        assert not set(part) & set(tensors), f"{path.name} repeats a tensor"
        tensors.update(part)
    return tensors


@pytest.mark.parametrize(
    "dtype,tied", [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "bfloat16-tied"]
)
def test_the_export_loads_with_transformers_and_equals_the_source(tmp_path, dtype, tied):
    from transformers import AutoModelForCausalLM

    model = _model(seed=3, tie_word_embeddings=tied)
    out = write_hf_directory(model.config, _parameters(model), None, tmp_path / "final", dtype)
    assert out == tmp_path / "final"
    expected = {name: p.detach().to(dtype) for name, p in model.named_parameters()}  # tied: written once
    assert ("lm_head.weight" in expected) is not tied
    written = _read_tensors(out)
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == dtype and torch.equal(written[name], tensor), name
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == dtype
    state = loaded.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    if tied:
        assert torch.equal(state["lm_head.weight"], expected["model.embed_tokens.weight"])
    # The loaded model computes what the source computes in that dtype.
    ids = torch.tensor([[1, 5, 7, 3, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.to(dtype)(ids).logits, rtol=0, atol=0)


def _greedy_files(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Reference packing: tensors in order, a new file when the next one would take this one over the limit."""
    files, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > limit:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return [*files, current]


def test_a_small_shard_size_gives_several_files_and_an_index(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(seed=1)
    limit = 6000
    out = write_hf_directory(model.config, _parameters(model), None, tmp_path / "final", torch.float32, True, limit)
    sizes = [(name, p.numel() * 4) for name, p in model.named_parameters()]
    expected_files = _greedy_files(sizes, limit)
    n = len(expected_files)
    assert n >= 3
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == names  # no model.safetensors, no part-*
    for name, tensors in zip(names, expected_files, strict=True):
        held = load_file(out / name)
        assert sorted(held) == sorted(tensors), name
        assert len(tensors) == 1 or sum(v.numel() * 4 for v in held.values()) <= limit
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(size for _, size in sizes)
    assert index["weight_map"] == {t: names[i] for i, tensors in enumerate(expected_files) for t in tensors}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach()), name

    one = write_hf_directory(model.config, _parameters(model), None, tmp_path / "one", torch.float32)
    assert sorted(p.name for p in one.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not (one / INDEX_NAME).exists()


def test_tokenizer_generation_config_and_extra_files_are_published(tmp_path):
    from transformers import GenerationConfig

    from recall_dist.data import load_tokenizer

    model = _model()
    tokenizer = load_tokenizer("char:product")
    out = write_hf_directory(
        model.config,
        _parameters(model),
        tokenizer,
        tmp_path / "final",
        torch.float32,
        generation_config=GenerationConfig(eos_token_id=[2, 7], max_new_tokens=11),
        extra_files={"README.md": "# tiny\n", "recipe.json": '{"loss": "nll"}'},
    )
    again = load_tokenizer(str(out))
    text = "1230456789"
    assert again.encode(text, add_bos=True) == tokenizer.encode(text, add_bos=True) and len(again) == len(tokenizer)
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [2, 7] and generation.max_new_tokens == 11
    assert (out / "README.md").read_text() == "# tiny\n" and (out / "recipe.json").read_text() == '{"loss": "nll"}'


def test_a_process_that_does_not_write_consumes_the_parameters_and_writes_nothing(tmp_path):
    model = _model()
    consumed = []

    def parameters():  # on the other ranks these are collective gathers: every process must run them all
        for name, _ in model.named_parameters():
            consumed.append(name)
            yield name, None

    assert write_hf_directory(model.config, parameters(), None, tmp_path / "final", torch.float32, writer=False) is None
    assert consumed == [name for name, _ in model.named_parameters()]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_the_previous_one_and_the_next_replaces_it(tmp_path):
    from transformers import AutoModelForCausalLM

    final = tmp_path / "final"
    old, new = _model(seed=1), _model(seed=2)
    write_hf_directory(old.config, _parameters(old), None, final, torch.float32, max_shard_bytes=4096)
    before = _files(final)
    seen_during = []

    def failing():
        for i, (name, p) in enumerate(new.named_parameters()):
            if i == 5:
                seen_during.append(_files(final))  # several shards of the new export are written by now
                raise RuntimeError("disk gone")
            yield name, p.detach()

    with pytest.raises(RuntimeError, match="disk gone"):
        write_hf_directory(new.config, failing(), None, final, torch.float32, max_shard_bytes=4096)
    assert seen_during == [before] and _files(final) == before  # untouched, during and after
    assert any((tmp_path / ".tmp-final").glob("part-*.safetensors"))  # the failed export's debris, aside
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert torch.equal(loaded.lm_head.weight, old.lm_head.weight)

    write_hf_directory(new.config, _parameters(new), None, final, torch.float32, max_shard_bytes=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # debris and the old export gone
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for name, p in new.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach()), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as export_hf uses it
def test_export_hf_reads_a_distributed_checkpoint(tmp_path):
    """A checkpoint directory as the FSDP2 backend lays it out (``config.yaml``, ``engine/`` written by
    ``torch.distributed.checkpoint`` under ``{"model": {"model.<name>": ...}}`` with optimizer state beside
    it), exported offline in the config's ``model.dtype`` (bfloat16 here; the checkpoint holds fp32 masters)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer

    model = {**_tiny_model_section(), "dtype": "bfloat16"}
    data = tiny_config_dict(tmp_path / "run", backend={"name": "fsdp2"}, model=model)
    source = _model(seed=7)
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    state = {f"model.{name}": p.detach().clone() for name, p in source.named_parameters()}
    optim = {f"model.{name}": torch.full_like(p, 3.0) for name, p in source.named_parameters()}
    dcp.save({"model": state, "optim": {"state": optim}}, checkpoint_id=str(step / "engine"), no_dist=True)
    (step / "config.yaml").write_text(yaml.safe_dump(data))

    out = export_hf(step, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    for name, p in source.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach().to(torch.bfloat16)), name
    assert len(load_tokenizer(str(out))) == loaded.config.vocab_size


def test_base_generation_config_is_the_pretrained_models_and_export_hf_publishes_it(tmp_path):
    """A base with generation_config.json: its stop ids and sampling defaults reach the export (offline
    here; the live export of a real run: tests/e2e/test_run_outputs.py); without one, or built from
    ``model.config``, there is none."""
    import torch.distributed.checkpoint as dcp
    from transformers import GenerationConfig

    from recall_dist.data import load_tokenizer
    from recall_dist.train.export import base_generation_config

    base = tmp_path / "base"
    source = _model(seed=3)
    source.save_pretrained(base)
    assert base_generation_config(None) is None
    (base / "generation_config.json").unlink(missing_ok=True)  # save_pretrained may write a default one
    assert base_generation_config(str(base)) is None
    GenerationConfig(eos_token_id=[2, 9], pad_token_id=0, do_sample=True, top_p=0.8).save_pretrained(base)
    assert base_generation_config(str(base)).eos_token_id == [2, 9]

    data = tiny_config_dict(tmp_path / "run", backend={"name": "fsdp2"}, model={"name_or_path": str(base)})
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    state = {f"model.{name}": p.detach().clone() for name, p in source.named_parameters()}
    dcp.save({"model": state}, checkpoint_id=str(step / "engine"), no_dist=True)
    (step / "config.yaml").write_text(yaml.safe_dump(data))
    load_tokenizer("char:product").save_pretrained(base)  # model.tokenizer defaults to the base's
    exported = GenerationConfig.from_pretrained(export_hf(step, tmp_path / "exported"))
    assert exported.eos_token_id == [2, 9] and exported.top_p == 0.8 and exported.do_sample
