"""MELP.forward's multi-positive switch: the loader's report_hash reaches both contrastive losses
when ``loss.multi_positive`` (demo preset: on; paper preset: off, the paper's loss)."""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import melp_scale.model.melp as melp_module
from kernels import infonce_loss
from melp_scale.model import MELP, MELPConfig
from melp_scale.report_hash import report_hash
from melp_scale.text import ReportTokenizer
from tests.test_model import NUM_SAMPLES, REPORTS

DUPLICATED = REPORTS + ["Sinus rhythm.  Normal ECG.", "sinus bradycardia."]  # two repeats of earlier reports


def test_forward_uses_report_hash_when_configured(monkeypatch):
    assert MELPConfig.preset("demo").loss.multi_positive and not MELPConfig.preset("paper").loss.multi_positive
    seen = []  # (op, positive_ids) of every loss call

    def spy(name):
        op = getattr(melp_module, name)

        def wrapped(*args, positive_ids=None, **kwargs):
            seen.append((name, positive_ids))
            return op(*args, positive_ids=positive_ids, **kwargs)
        return wrapped

    for name in ("infonce_loss", "local_contrastive_loss"):
        monkeypatch.setattr(melp_module, name, spy(name))
    config = MELPConfig.preset("demo")
    torch.manual_seed(0)
    model = MELP(config).eval()
    batch = ReportTokenizer(config.text.name_or_path, config.text.max_length).batch(DUPLICATED)
    batch["ecg"] = torch.rand(len(DUPLICATED), 12, NUM_SAMPLES, generator=torch.Generator().manual_seed(0))
    hashes = torch.tensor([report_hash(r) for r in DUPLICATED])
    assert len(set(hashes.tolist())) == len(DUPLICATED) - 2
    with torch.no_grad():
        multi = model({**batch, "report_hash": hashes})
        assert [name for name, _ in seen] == ["infonce_loss", "local_contrastive_loss"]
        assert all(ids is hashes for _, ids in seen)
        plain = model(batch)  # no report_hash: the one-positive losses
        config.loss.multi_positive = False
        seen.clear()
        switched_off = model({**batch, "report_hash": hashes})
        assert all(ids is None for _, ids in seen) and len(seen) == 2
    scale = model.logit_scale[0]
    torch.testing.assert_close(multi.loss_global, infonce_loss(multi.ecg_global, multi.text_global, scale,
                                                               positive_ids=hashes), rtol=0, atol=0)
    for name in ("loss_global", "loss_local"):
        torch.testing.assert_close(getattr(switched_off, name), getattr(plain, name), rtol=0, atol=0)
