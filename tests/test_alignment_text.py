"""Stage-1 training text: the FINDINGS + IMPRESSION pairing and ConVIRT-style sentence sampling."""

from __future__ import annotations

import torch

from medfuse_core.objectives.alignment import report_sentences, report_text, sample_sentences

REPORT = """EXAMINATION: CHEST (PA AND LAT)
INDICATION: ___ with cough.
FINDINGS: Small left pleural effusion. No pneumothorax; heart size is normal.
IMPRESSION: Small left effusion.
"""


def test_report_text_pairs_findings_and_impression_only():
    text = report_text(REPORT)
    assert "effusion" in text and "cough" not in text and "EXAMINATION" not in text


def test_sentences_split_on_stops_and_semicolons():
    assert report_sentences("Small left pleural effusion. No pneumothorax; heart size is normal.  Stable.") == [
        "Small left pleural effusion.", "No pneumothorax;", "heart size is normal.", "Stable."]
    assert report_sentences("") == []
    assert report_sentences("No change") == ["No change"]


def test_sample_sentences_draws_one_sentence_each_and_is_seeded():
    texts = [report_text(REPORT), "", "One finding only."]
    a = sample_sentences(texts, torch.Generator().manual_seed(3))
    b = sample_sentences(texts, torch.Generator().manual_seed(3))
    assert a == b
    assert a[0] in report_sentences(texts[0]) and a[1] == "" and a[2] == "One finding only."
    seen = {sample_sentences(texts[:1], torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert seen == set(report_sentences(texts[0]))  # every sentence gets drawn


def test_text_ids_match_for_identical_reports_only():
    from medfuse_core.objectives.alignment import text_id

    normal = "No acute cardiopulmonary process."
    assert text_id(normal) == text_id("  no acute   cardiopulmonary process. ")  # case and spacing
    assert text_id(normal) != text_id("Small left pleural effusion.")
    assert -(2 ** 63) <= text_id(normal) < 2 ** 63  # fits the int64 tensor the loss gathers


def test_pretrain_batches_carry_text_ids_and_the_mask_is_on_by_default():
    import numpy as np

    from medfuse_core.config import PretrainConfig
    from medfuse_core.models.text import load_tokenizer
    from medfuse_core.objectives import build_objective

    cfg = PretrainConfig.model_validate({"data": {"image_size": 16}, "model": {"text": {"max_tokens": 16}}})
    assert cfg.objective.mask_duplicate_texts
    objective = build_objective(cfg)
    img = np.zeros((16, 16), np.uint16).tobytes()
    rows = {"image": [img] * 3, "image_size": [16] * 3,
            "report": [REPORT, REPORT, "FINDINGS: Small right effusion."]}
    batch = objective.make_batch(rows, load_tokenizer(cfg.model.text.name_or_path), train=True,
                                 generator=torch.Generator().manual_seed(0))
    ids = batch["text_ids"].tolist()
    assert batch["text_ids"].dtype == torch.int64 and ids[0] == ids[1] != ids[2]
    assert "group_ids" not in batch  # positives: pair (the default) needs no reading


def test_findings_positives_group_reports_by_their_reading():
    import numpy as np

    from medfuse_core.config import PretrainConfig
    from medfuse_core.models.text import load_tokenizer
    from medfuse_core.objectives import build_objective

    cfg = PretrainConfig.model_validate({"data": {"image_size": 16}, "model": {"text": {"max_tokens": 16}},
                                         "objective": {"name": "infonce", "positives": "findings"}})
    objective = build_objective(cfg)
    img = np.zeros((16, 16), np.uint16).tobytes()
    rows = {"image": [img] * 4, "image_size": [16] * 4,
            "report": [REPORT, "FINDINGS: Small right effusion.", "FINDINGS: No effusion. Lungs are clear.",
                       "IMPRESSION: No acute cardiopulmonary process."]}
    batch = objective.make_batch(rows, load_tokenizer(cfg.model.text.name_or_path), train=True,
                                 generator=torch.Generator().manual_seed(0))
    g = batch["group_ids"].tolist()
    assert batch["group_ids"].dtype == torch.int64
    assert g[0] == g[1] != g[2] == g[3]  # two effusions (other words, other side); two normal reports
    assert batch["text_ids"][0] != batch["text_ids"][1]  # the texts themselves differ


def test_positives_must_be_a_known_kind():
    import pytest
    from pydantic import ValidationError

    from medfuse_core.config import PretrainConfig

    with pytest.raises(ValidationError, match="positives"):
        PretrainConfig.model_validate({"objective": {"name": "infonce", "positives": "labels"}})
