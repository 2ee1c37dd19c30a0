"""Report sentence augmentation (data.sentence_dropout / data.sentence_shuffle): each sentence
left out with probability p (one always kept), the rest optionally shuffled; exact resume."""
import json
from collections import Counter
from itertools import permutations

import numpy as np
import pytest

from melp_scale.text import augment_sentences
from tests.test_stream import loader, make_shards, same_batch, tokenizer  # noqa: F401 (fixture)

SENTENCES = ["alpha", "beta", "gamma", "delta"]


def test_no_augmentation_is_identity():
    rng = np.random.default_rng()
    assert augment_sentences(SENTENCES, 0.0, False, rng) == SENTENCES
    assert augment_sentences(["only"], 0.9, True, rng) == ["only"]
    assert augment_sentences([], 0.5, True, rng) == []


def test_keep_probability_and_never_empty():
    """P(sentence kept) = (1 - p) + p**n / n for n sentences (the all-dropped case keeps one
    uniformly chosen sentence); order preserved without shuffle."""
    rng = np.random.default_rng()
    p, n, draws = 0.5, len(SENTENCES), 20000
    kept = Counter()
    for _ in range(draws):
        out = augment_sentences(SENTENCES, p, False, rng)
        assert out and len(set(out)) == len(out)
        assert out == [s for s in SENTENCES if s in out]  # input order
        kept.update(out)
    expected = (1 - p) + p ** n / n
    for sentence in SENTENCES:
        assert abs(kept[sentence] / draws - expected) < 0.02, (sentence, kept[sentence] / draws)


def test_shuffle_is_uniform_over_orders():
    rng = np.random.default_rng()
    three, draws = SENTENCES[:3], 12000
    orders = Counter(tuple(augment_sentences(three, 0.0, True, rng)) for _ in range(draws))
    assert set(orders) == set(permutations(three))
    for count in orders.values():
        assert abs(count / draws - 1 / 6) < 0.02


def test_stream_subsets_are_true_deterministic_and_off_in_validation(tmp_path, tokenizer):  # noqa: F811
    make_shards(tmp_path, (7, 5), val_sizes=(3,))
    settings = {"sentence_dropout": 0.5, "sentence_shuffle": True}
    first = list(loader(tmp_path, tokenizer, **settings))
    again = list(loader(tmp_path, tokenizer, **settings))
    assert all(same_batch(a, b) for a, b in zip(first, again))
    plain = list(loader(tmp_path, tokenizer))
    counts = np.concatenate([b["sentence_counts"].numpy() for b in first])
    assert set(counts) <= {1, 2} and 1 in counts  # some reports lost a sentence, none all
    assert set(np.concatenate([b["sentence_counts"].numpy() for b in plain])) == {2}
    hashes = np.concatenate([b["report_hash"].numpy() for b in first])
    full = np.concatenate([b["report_hash"].numpy() for b in plain])
    assert (hashes != full).any()  # the hash follows the text the model sees
    for batch in first:  # every token row decodes to sentences of its own record
        for key, ids, mask in zip(batch["keys"], batch["input_ids"], batch["attention_mask"]):
            text = tokenizer.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            shard, record = key.split("_s")[1].split("_r")
            allowed = {"sinus rhythm", f"record {shard} {record}"}
            pieces = {p.strip() for p in text.replace(" . ", ".").split(".") if p.strip()}
            assert pieces and pieces <= allowed, (key, text)
    validation = loader(tmp_path, tokenizer, **settings).config.for_validation()
    assert validation.sentence_dropout == 0.0 and not validation.sentence_shuffle
    # resume after one batch: the rest is exactly the uninterrupted run's
    stopped = loader(tmp_path, tokenizer, **settings)
    iterator = iter(stopped)
    next(iterator)
    state = json.loads(json.dumps(stopped.state_dict()))
    resumed = loader(tmp_path, tokenizer, **settings)
    resumed.load_state_dict(state)
    assert all(same_batch(a, b) for a, b in zip(list(resumed), first[1:]))


def test_bad_setting_is_refused(tmp_path, tokenizer):  # noqa: F811
    make_shards(tmp_path, (3,))
    with pytest.raises(ValueError, match="sentence_dropout"):
        loader(tmp_path, tokenizer, sentence_dropout=1.0)
