import random

import pytest
import torch

from recall_dist.data.loader import DistributedBatchIterator


def make_dataset(n, seed=0, max_len=9):
    """Variable-length examples whose tokens identify them: example i is [1, i+3, ..., 2]."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        length = rng.randint(2, max_len)
        ids = [1] + [i + 3] * (length - 2) + [2]
        prompt = rng.randint(1, length - 1)
        data.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return data


def unpack(batch):
    """Examples of a batch in micro-batch order, rebuilt from sequence_ids: (input_ids, labels)."""
    seq = batch["sequence_ids"]
    out = []
    for k in range(int(seq.max()) + 1):
        mask = seq == k
        out.append((batch["input_ids"][mask].tolist(), batch["labels"][mask].tolist()))
    return out


def expected(example):
    """What the iterator must deliver for one example: its first label is never a target."""
    return (example["input_ids"], [-100, *example["labels"][1:]])


def reference_pad(examples, pad):
    """Plain-Python padding of one example per row."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]
    labels = [[-100] + e["labels"][1:] + [-100] * (width - len(e["labels"])) for e in examples]
    seq = [[i] * len(e["input_ids"]) + [-1] * (width - len(e["input_ids"])) for i, e in enumerate(examples)]
    return ids, labels, seq


def test_single_process_batches_match_reference_padding():
    data = make_dataset(10)
    it = DistributedBatchIterator(data, micro_batch_size=3, seed=4, pad_token_id=7)
    assert len(it) == 3
    batches = list(it)
    assert len(batches) == 3 and (it.epoch, it.step) == (1, 0)
    order = it.epoch_order(0)
    assert sorted(order) == list(range(10))
    for step, batch in enumerate(batches):
        examples = [data[i] for i in order[step * 3 : (step + 1) * 3]]
        ids, labels, seq = reference_pad(examples, pad=7)
        assert batch["input_ids"].tolist() == ids
        assert batch["labels"].tolist() == labels
        assert batch["sequence_ids"].tolist() == seq
        assert batch["attention_mask"].tolist() == [[int(s >= 0) for s in row] for row in seq]
        assert batch["position_ids"][0, : len(examples[0]["input_ids"])].tolist() == list(
            range(len(examples[0]["input_ids"]))
        )
        assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("dp_size,packing", [(2, False), (3, False), (3, True), (4, True)])
def test_union_over_ranks_equals_single_process_global_batch(dp_size, packing):
    data = make_dataset(29, seed=1)
    mbs = 2
    kwargs = {"seed": 9, "packing": packing, "max_length": 12 if packing else None}
    single = DistributedBatchIterator(data, micro_batch_size=mbs * dp_size, **kwargs)
    ranks = [DistributedBatchIterator(data, mbs, dp_rank=r, dp_size=dp_size, **kwargs) for r in range(dp_size)]
    assert all(len(r) == len(single) == 29 // (mbs * dp_size) for r in ranks)
    for epoch in range(2):
        global_batches = [unpack(b) for b in single]
        per_rank = [[unpack(b) for b in r] for r in ranks]
        assert len(global_batches) == len(single)
        for step, global_batch in enumerate(global_batches):
            union = [ex for r in range(dp_size) for ex in per_rank[r][step]]
            assert union == global_batch
            assert global_batch == [expected(data[i]) for i in single.global_batch_indices(epoch, step)]
        seen = [i for s in range(len(single)) for i in single.global_batch_indices(epoch, s)]
        assert len(set(seen)) == len(seen) == len(single) * mbs * dp_size  # drop_last: 29 % G skipped


def test_epochs_reshuffle_and_no_shuffle_keeps_order():
    data = make_dataset(12)
    it = DistributedBatchIterator(data, 4, seed=0)
    assert it.epoch_order(0) != it.epoch_order(1)
    assert it.epoch_order(1) == DistributedBatchIterator(data, 2, dp_size=2, dp_rank=1, seed=0).epoch_order(1)
    assert it.epoch_order(0) != DistributedBatchIterator(data, 4, seed=1).epoch_order(0)
    plain = DistributedBatchIterator(data, 2, dp_rank=1, dp_size=2, shuffle=False)
    assert [unpack(b) for b in plain] == [[expected(data[4 * s + 2]), expected(data[4 * s + 3])] for s in range(3)]


def test_packing_first_fit_and_lengths():
    data = make_dataset(40, seed=3)
    it = DistributedBatchIterator(data, 8, seed=2, packing=True, max_length=14)
    for step, batch in enumerate(it):
        examples = [data[i] for i in it.local_indices(0, step)]
        # reference first-fit over the micro-batch in order
        free, rows = [], []
        for k, e in enumerate(examples):
            n = len(e["input_ids"])
            r = next((r for r, space in enumerate(free) if n <= space), None)
            if r is None:
                free.append(14 - n)
                rows.append([k])
            else:
                free[r] -= n
                rows[r].append(k)
        assert batch["input_ids"].shape[0] == len(rows) <= 8
        assert batch["input_ids"].shape[1] <= 14
        for r, row in enumerate(rows):
            ids = batch["sequence_ids"][r]
            assert [k for k in dict.fromkeys(ids.tolist()) if k >= 0] == row
        assert unpack(batch) == [expected(e) for e in examples]
        pad = batch["sequence_ids"] < 0
        assert (batch["labels"][pad] == -100).all() and (batch["attention_mask"][pad] == 0).all()
        # position ids restart at every example
        starts = batch["position_ids"] == 0
        assert int((starts & ~pad).sum()) == len(examples)


@pytest.mark.parametrize("k", [0, 2, 5, 7])
def test_resume_continues_with_the_next_batch(k):
    data = make_dataset(23, seed=5)
    kwargs = {"micro_batch_size": 2, "dp_rank": 1, "dp_size": 2, "seed": 3}

    def run(it, epochs):
        out = []
        for _ in range(epochs):
            out += [unpack(b) for b in it]
        return out

    full = run(DistributedBatchIterator(data, **kwargs), 3)  # 5 steps per epoch
    it = DistributedBatchIterator(data, **kwargs)
    head = []
    while len(head) < k:
        for batch in it:
            head.append(unpack(batch))
            if len(head) == k:
                break
    state = it.state_dict()
    resumed = DistributedBatchIterator(data, **kwargs)
    resumed.load_state_dict(state)
    rest = []
    while len(head) + len(rest) < len(full):
        rest += [unpack(b) for b in resumed]
    assert head + rest == full


def test_dp_size_may_change_if_global_batch_does_not():
    data = make_dataset(16)
    a = DistributedBatchIterator(data, 4, dp_size=1, seed=1)
    next(iter(a))
    b = [DistributedBatchIterator(data, 2, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    for r in b:
        r.load_state_dict(a.state_dict())
    union = unpack(next(iter(b[0]))) + unpack(next(iter(b[1])))
    assert union == unpack(next(iter(a)))


def _step_examples(iterators, accumulation, steps):
    """The examples of each optimizer step, over all ranks and micro-batches, in global order."""
    streams = [iter(_endless(it)) for it in iterators]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(accumulation):
            for stream in streams:  # rank order
                step += unpack(next(stream))
        out.append(step)
    return out


def _endless(it):
    while True:
        yield from it


# (micro_batch_size, dp_size, accumulation_steps): three splits of an 8-example optimizer step
SPLITS = [(8, 1, 1), (2, 1, 4), (2, 2, 2), (4, 2, 1)]


@pytest.mark.parametrize("split", SPLITS[1:], ids=str)
def test_every_split_of_a_step_sees_the_same_examples_across_epochs(split):
    data = make_dataset(21, seed=2)  # 21 = 2 steps of 8 + 5 dropped per epoch, for every split
    micro, dp, acc = split
    ref = _step_examples([DistributedBatchIterator(data, 8, seed=4)], 1, 6)
    ranks = [DistributedBatchIterator(data, micro, r, dp, seed=4, accumulation_steps=acc) for r in range(dp)]
    assert len(ranks[0]) == 2 * acc
    assert _step_examples(ranks, acc, 6) == ref


@pytest.mark.parametrize("before,after", [(SPLITS[2], SPLITS[0]), (SPLITS[0], SPLITS[2]), (SPLITS[1], SPLITS[3])])
def test_resume_on_another_split_continues_the_same_steps(before, after):
    data = make_dataset(21, seed=2)
    ref = _step_examples([DistributedBatchIterator(data, 8, seed=4)], 1, 5)
    micro, dp, acc = before
    first = [DistributedBatchIterator(data, micro, r, dp, seed=4, accumulation_steps=acc) for r in range(dp)]
    head = _step_examples(first, acc, 3)  # crosses the first epoch's end
    micro, dp, acc = after
    second = [DistributedBatchIterator(data, micro, r, dp, seed=4, accumulation_steps=acc) for r in range(dp)]
    for it in second:
        it.load_state_dict(first[0].state_dict())
    assert head + _step_examples(second, acc, 2) == ref


def test_resume_refuses_another_step_batch_or_a_position_inside_a_micro_batch():
    data = make_dataset(21, seed=2)
    a = DistributedBatchIterator(data, 4, seed=4)
    next(iter(a))
    with pytest.raises(ValueError, match="step_batch_size = 4 differs"):
        DistributedBatchIterator(data, 8, seed=4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a multiple of this iterator's 8 examples per micro-batch"):
        DistributedBatchIterator(data, 8, seed=4, accumulation_steps=1).load_state_dict(
            {**a.state_dict(), "step_batch_size": 8}
        )


def test_errors_name_the_problem():
    data = make_dataset(5)
    with pytest.raises(ValueError, match="packing = True needs max_length"):
        DistributedBatchIterator(data, 2, packing=True)
    with pytest.raises(ValueError, match="5 examples, fewer than one optimizer step"):
        DistributedBatchIterator(data, 3, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank = 2"):
        DistributedBatchIterator(data, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size = 0"):
        DistributedBatchIterator(data, 0)
    with pytest.raises(ValueError, match="> max_length 3"):
        next(iter(DistributedBatchIterator(make_dataset(4, max_len=9), 4, max_length=3, shuffle=False)))
    state = DistributedBatchIterator(data, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed = 1 differs"):
        DistributedBatchIterator(data, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="step_batch_size = 2 differs"):
        DistributedBatchIterator(data, 1, seed=1).load_state_dict(state)
