"""Classification-guided drafting (``model.guidance``) and the claim that report training pays:
a few steps of the real objective on a tiny corpus lower the loss and lift clinical F1 above
the same model untrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse_core.models.report import DecodingConfig, draft_reports, encode_guides, guide_prompt
from medfuse_core.models.tiny_lm import save_tiny_causal_lm

POSITIVE = "FINDINGS: There is a large right pleural effusion. IMPRESSION: Pleural effusion."
NEGATIVE = "FINDINGS: The lungs are clear. No pleural effusion. IMPRESSION: No acute cardiopulmonary process."
NAN = float("nan")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "llama", "llama", hidden=64, layers=2, heads=2))


def _cfg(lm_dir, guided: bool):
    from medfuse_core.config import ReportConfig

    return ReportConfig.model_validate({
        "data": {"image_size": 32, "use_context": False, "augment": False, "max_report_tokens": 32},
        "model": {"vision": {"name": "resnet18"}, "lm": {"name_or_path": lm_dir},
                  "guidance": {"enabled": guided, "labels": ["Pleural Effusion", "Edema"]}},
        "train": {"batch_size": 8}})


def _corpus(n: int, seed: int):
    """Images with a bright lower-right blob (effusion) or without, their reports and labels."""
    rng = np.random.default_rng(seed)
    from medfuse_core.data.labels import CHEXPERT_LABELS

    eff = CHEXPERT_LABELS.index("Pleural Effusion")
    images, reports, labels, positive = [], [], [], []
    for k in range(n):
        img = rng.normal(0.3, 0.05, (32, 32)).clip(0, 1).astype(np.float32)
        pos = bool(k % 2)
        if pos:
            img[20:30, 18:30] = 0.95
        lab = [NAN] * len(CHEXPERT_LABELS)
        lab[eff] = 1.0 if pos else 0.0
        images.append(img.astype(np.float16).tobytes())
        reports.append(POSITIVE if pos else NEGATIVE)
        labels.append(lab)
        positive.append(pos)
    return {"image": np.asarray(images, dtype=object), "image_size": np.full(n, 32), "report": np.asarray(reports),
            "context": np.asarray([""] * n, dtype=object), "labels": np.asarray(labels, dtype=object),
            "labelled": np.ones(n, dtype=bool)}, np.asarray(positive)


def test_guide_prompts_name_the_flagged_findings():
    assert guide_prompt(["Pleural Effusion", "Edema"], [True, False]) == "Flagged: pleural effusion."
    assert guide_prompt(["Pleural Effusion", "Edema"], [False, False]) == "Flagged: none."
    from medfuse_core.objectives.report_generation import report_tokenizer

    tok = report_tokenizer("minilm")
    ids, mask = encode_guides(tok, ["Edema"], np.array([[1], [0]]), present=np.array([True, False]))
    assert mask[0].sum() > 0 and mask[1].sum() == 0  # an unlabelled study gets no prompt


def test_guide_batch_flags_positives_only_and_skips_unlabelled_studies(lm_dir):
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.objectives.report_generation import guide_batch, report_tokenizer

    row = [NAN] * len(CHEXPERT_LABELS)
    unc = list(row)
    unc[CHEXPERT_LABELS.index("Edema")] = -1.0
    pos = list(row)
    pos[CHEXPERT_LABELS.index("Edema")] = 1.0
    rows = {"labels": [pos, unc, pos], "labelled": np.array([True, True, False])}
    out = guide_batch(rows, report_tokenizer(lm_dir), ["Pleural Effusion", "Edema"])
    assert out["guide_targets"].tolist() == [[0, 1], [0, 0], [0, 1]]  # uncertain and blank are not flagged
    assert out["guide_weights"][2].sum() == 0 and out["guide_mask"][2].sum() == 0


def _train(cfg, rows, steps: int, seed: int = 0):
    from medfuse_core.objectives.report_generation import ReportObjective

    torch.manual_seed(seed)
    objective = ReportObjective(cfg)
    model = objective.build_model()
    tokenizer = objective.tokenizer()
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    n = len(rows["report"])
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randperm(n, generator=g)[:8].numpy()
        batch = objective.make_batch({k: v[idx] for k, v in rows.items()}, tokenizer, train=True, generator=g)
        loss = objective.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), untrained, tokenizer, losses


def _clinical_f1(model, tokenizer, rows, thresholds=None):
    from medfuse_core.data.batching import blobs_to_tensor
    from medfuse_core.evaluation.report_labeler import LABELERS, clinical_efficacy

    images = blobs_to_tensor(rows["image"], rows["image_size"], 32)
    drafts = draft_reports(model, images, tokenizer, DecodingConfig(max_new_tokens=24), guide_thresholds=thresholds)
    ce = clinical_efficacy(drafts, list(rows["report"]), labeler=LABELERS.get("rules")())
    return ce["per_label_f1"]["Pleural Effusion"] or 0.0, drafts


@pytest.fixture(scope="module")
def guided(lm_dir):
    train, _ = _corpus(48, seed=0)
    return _train(_cfg(lm_dir, True), train, steps=70)


@pytest.mark.parametrize("kind", ["plain", "guided"])
def test_training_on_a_tiny_corpus_lowers_the_loss_and_lifts_clinical_f1(lm_dir, guided, kind):
    if kind == "plain":
        train, _ = _corpus(48, seed=0)
        model, untrained, tokenizer, losses = _train(_cfg(lm_dir, False), train, steps=90)
    else:
        model, untrained, tokenizer, losses = guided
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    test, _ = _corpus(16, seed=1)
    trained_f1, drafts = _clinical_f1(model, tokenizer, test)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(untrained)
    untrained_f1, _ = _clinical_f1(model, tokenizer, test)
    model.load_state_dict(trained)
    assert trained_f1 > untrained_f1 + 0.3 and trained_f1 >= 0.8, (trained_f1, untrained_f1, drafts[:2])


def test_a_guided_model_follows_its_flags(guided):
    """Thresholds steer the draft: flag everything and every draft reports an effusion."""
    from medfuse_core.evaluation.report_labeler import LABELERS

    model, _, tokenizer, _ = guided
    test, _ = _corpus(8, seed=2)
    from medfuse_core.data.batching import blobs_to_tensor

    images = blobs_to_tensor(test["image"], test["image_size"], 32)
    labeler = LABELERS.get("rules")()
    from medfuse_core.data.labels import CHEXPERT_LABELS

    eff = CHEXPERT_LABELS.index("Pleural Effusion")
    for cut, expected in ((0.0, 1.0), (1.01, 0.0)):
        drafts = draft_reports(model, images, tokenizer, DecodingConfig(max_new_tokens=24), guide_thresholds=[cut, cut])
        found = np.nan_to_num(labeler(drafts)[:, eff], nan=0.0)
        assert (found == expected).all(), drafts
    # flags given instead of the head's (a reader's findings, or the reference labels)
    names = list(model.guide_labels)
    given = torch.zeros(len(images), len(names), dtype=torch.bool)
    given[::2, names.index("Pleural Effusion")] = True
    drafts = draft_reports(model, images, tokenizer, DecodingConfig(max_new_tokens=24), flags=given)
    found = np.nan_to_num(labeler(drafts)[:, eff], nan=0.0)
    assert (found == given[:, names.index("Pleural Effusion")].numpy()).all(), drafts
    with pytest.raises(ValueError, match="flags"):
        draft_reports(model, images, tokenizer, DecodingConfig(max_new_tokens=4), flags=given[:, :1])


def test_no_finding_is_flagged_only_when_nothing_else_is(lm_dir):
    from medfuse_core.config import VisionConfig
    from medfuse_core.models.report import ReportGenerator, guide_flags
    from medfuse_core.models.vision import build_vision_encoder
    from transformers import AutoModelForCausalLM

    vision = build_vision_encoder(VisionConfig(name="resnet18"), 32, load_weights=False)
    model = ReportGenerator(vision, AutoModelForCausalLM.from_pretrained(lm_dir),
                            guide_labels=["No Finding", "Edema", "Support Devices"]).eval()
    images = torch.randn(2, 1, 32, 32)
    _, all_on = guide_flags(model, images, [0.0, 0.0, 0.0])
    assert all_on.tolist() == [[False, True, True]] * 2
    _, devices_only = guide_flags(model, images, [0.0, 1.01, 0.0])
    assert devices_only.tolist() == [[True, False, True]] * 2


def test_a_finding_the_head_cannot_see_is_never_flagged():
    from medfuse_core.evaluation.metrics import NEVER_FLAG, choose_thresholds

    rng = np.random.default_rng(0)
    n = 200
    seen = rng.random(n) < 0.3
    blind = rng.random(n) < 0.3
    labels = np.stack([seen, blind, np.zeros(n, bool)], 1).astype(float)
    # the first head separates its finding; the second scores every image alike (AUROC 0.5), where
    # the F1-best cut alone flags every image; the third finding has no validate positives
    probs = np.stack([np.where(seen, 0.8, 0.2) + rng.normal(0, 0.05, n), np.full(n, 0.3), rng.random(n)], 1)
    plain = choose_thresholds(probs, labels)
    assert NEVER_FLAG not in plain and plain[1] <= 0.3  # the degenerate cut: everything flagged
    assert choose_thresholds(probs, labels, min_auroc=0.5).tolist() == plain.tolist()
    cuts = choose_thresholds(probs, labels, min_auroc=0.6)
    assert (cuts == NEVER_FLAG).tolist() == [False, True, False] and not (probs[:, 1] >= cuts[1]).any()
    assert 0.2 < cuts[0] < 0.8 and cuts[2] == 0.5


def test_reranking_keeps_the_candidate_that_agrees_with_the_flags():
    from medfuse_core.evaluation.report_inference import most_consistent

    names = ["Pleural Effusion", "Edema"]
    flags = torch.tensor([[True, False], [False, False], [True, True]])
    candidates = [[NEGATIVE, POSITIVE],  # flagged effusion: the second candidate writes it
                  [NEGATIVE, POSITIVE],  # nothing flagged: the first (ties keep the earlier)
                  [POSITIVE, "FINDINGS: Small effusion with mild pulmonary edema. IMPRESSION: Edema and effusion."]]
    assert most_consistent(candidates, flags, names) == [POSITIVE, NEGATIVE, candidates[2][1]]


def test_draft_batch_with_candidates_follows_flags_at_least_as_well_as_one_draft(guided, lm_dir, monkeypatch):
    from types import SimpleNamespace

    from medfuse_core.evaluation import report_inference

    from medfuse_core.config import ConfigError, DecodingSettings
    from medfuse_core.data.batching import blobs_to_tensor
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.report_inference import draft_batch
    from medfuse_core.evaluation.report_labeler import LABELERS

    model, _, tokenizer, _ = guided
    test, _ = _corpus(8, seed=3)
    images = blobs_to_tensor(test["image"], test["image_size"], 32)
    names = list(model.guide_labels)
    flags = torch.zeros(len(images), len(names), dtype=torch.bool)
    flags[1::2, names.index("Pleural Effusion")] = True
    bundle = SimpleNamespace(model=model, tokenizer=tokenizer, extra={}, image_size=32)
    labeler = LABELERS.get("rules")()
    eff = CHEXPERT_LABELS.index("Pleural Effusion")

    def agreement(drafts):
        found = np.nan_to_num(labeler(drafts)[:, eff], nan=0.0) == 1.0
        return found == flags[:, names.index("Pleural Effusion")].numpy()

    one = draft_batch(bundle, images, None, DecodingSettings(max_new_tokens=24), flags=flags)
    seen, choose = [], report_inference.most_consistent
    monkeypatch.setattr(report_inference, "most_consistent", lambda c, f, n: seen.append(c) or choose(c, f, n))
    many = draft_batch(bundle, images, None, DecodingSettings(max_new_tokens=24, candidates=4, temperature=1.5),
                       flags=flags)
    (candidates,) = seen  # every image had 4 candidates, the first of them the single draft
    assert [len(c) for c in candidates] == [4] * len(images) and [c[0] for c in candidates] == one
    assert all(m in c for m, c in zip(many, candidates))
    monkeypatch.undo()
    assert len(many) == len(images) and all("FINDINGS:" in d and "IMPRESSION:" in d for d in many)
    assert (agreement(many) >= agreement(one)).all(), (one, many)
    assert many == draft_batch(bundle, images, None, DecodingSettings(max_new_tokens=24, candidates=4,
                                                                          temperature=1.5), flags=flags)  # seeded
    plain = SimpleNamespace(model=_train(_cfg(lm_dir, False), _corpus(8, seed=0)[0], steps=1)[0], tokenizer=tokenizer,
                            extra={}, image_size=32)
    with pytest.raises(ConfigError, match="decoding.candidates"):
        draft_batch(plain, images, None, DecodingSettings(max_new_tokens=4, candidates=2))
