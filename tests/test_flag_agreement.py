"""Drafts made to state their findings flags (``decoding.flag_agreement``) with sentences mined
from the training reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.evaluation.flag_agreement import agree_with_flags, mine_flag_sentences
from medfuse_core.evaluation.report_labeler import rule_labeler

NAMES = ["Pleural Effusion", "Pneumothorax", "Edema", "Support Devices", "No Finding"]
NORMAL = "FINDINGS: The lungs are clear. No pleural effusion. IMPRESSION: No acute cardiopulmonary process."
DEVICES = "FINDINGS: ET tube tip 4 cm from the carina. Lungs are clear. IMPRESSION: Lines and tubes as above."
REPORTS = (
    [NORMAL] * 4
    + [DEVICES] * 6   # "lungs are clear" is said here too, but normal sentences come from normal reports
    + ["FINDINGS: Small right pneumothorax. IMPRESSION: Small right pneumothorax."] * 3
    + ["FINDINGS: Possible small effusion. IMPRESSION: Possible small effusion."] * 5   # hedged: never kept
    + ["FINDINGS: Large left pleural effusion. IMPRESSION: Left effusion."] * 2         # too rare: never kept
    + ["FINDINGS: Pulmonary edema and bilateral pleural effusions. IMPRESSION: Edema and effusions."] * 3
)


def _stated(drafts, names=NAMES):
    """The labels the rule labeler reads as positive in each draft, over ``names``."""
    cols = [CHEXPERT_LABELS.index(n) for n in names]
    return rule_labeler(drafts)[:, cols] == 1.0


def test_mining_keeps_common_unhedged_sentences_per_set_of_findings():
    mined = mine_flag_sentences(REPORTS, NAMES, style=str.lower)
    findings = {tuple(e["labels"]): e["text"] for e in mined["findings"] if e["labels"]}
    impression = {tuple(e["labels"]): e["text"] for e in mined["impression"] if e["labels"]}
    assert findings[("Pneumothorax",)] == "small right pneumothorax."
    assert findings[("Edema", "Pleural Effusion")] == "pulmonary edema and bilateral pleural effusions."
    assert findings[("Support Devices",)] == "et tube tip 4 cm from the carina."
    assert ("Pleural Effusion",) not in findings and ("Pleural Effusion",) not in impression   # hedged or rare
    # every common way of saying "normal", from normal reports only
    assert [e["text"] for e in mined["findings"] if not e["labels"]] == ["no pleural effusion.", "the lungs are clear."]
    assert [e["text"] for e in mined["impression"] if not e["labels"]] == ["no acute cardiopulmonary process."]
    assert impression[("Edema", "Pleural Effusion")] == "edema and effusions."
    # nothing said by fewer than min_patients patients is kept; one patient's reports count once
    patients = [f"p{k}" for k in range(len(REPORTS))]
    patients[10:13] = ["p10"] * 3   # the three pneumothorax reports are one patient's
    one_patient = mine_flag_sentences(REPORTS, NAMES, patients)
    assert ("Pneumothorax",) not in {tuple(e["labels"]) for e in one_patient["findings"]}
    assert mine_flag_sentences(REPORTS, NAMES, min_patients=7) == {"findings": [], "impression": []}
    assert mine_flag_sentences(REPORTS, NAMES, min_patients=6) == {
        "findings": [{"labels": ["Support Devices"], "text": "ET tube tip 4 cm from the carina."}],
        "impression": [{"labels": ["Support Devices"], "text": "Lines and tubes as above."}]}
    # bounded: only the first max_reports reports are read (here the normal ones)
    assert mine_flag_sentences(REPORTS, NAMES, max_reports=4)["findings"] == [
        {"labels": [], "text": "No pleural effusion."}, {"labels": [], "text": "The lungs are clear."}]


def test_agreement_makes_drafts_state_their_flags():
    mined = mine_flag_sentences(REPORTS, NAMES, style=str.lower)
    drafts = ["FINDINGS: normal heart size. no pneumothorax.\nIMPRESSION: no acute cardiopulmonary process.",
              "FINDINGS: small right pneumothorax. normal heart size.\nIMPRESSION: small right pneumothorax.",
              "FINDINGS: small right pneumothorax. pulmonary edema.\nIMPRESSION: pulmonary edema."]
    flags = np.array([[True, True, True, False, False],     # all three left out, the pneumothorax denied
                      [False, False, False, False, True],   # nothing flagged, a pneumothorax stated
                      [False, False, True, False, False]])  # edema stated; the pneumothorax is not flagged
    assert agree_with_flags(drafts, flags, NAMES, mined, "none") == drafts
    added = agree_with_flags(drafts, flags, NAMES, mined, "add")
    assert added[0] == ("FINDINGS: normal heart size. pulmonary edema and bilateral pleural effusions. "
                        "small right pneumothorax.\nIMPRESSION: edema and effusions. small right pneumothorax.")
    # a sentence said twice is kept once; an impression that is not a normal statement stays
    twice = ["FINDINGS: normal heart size. normal heart size.\nIMPRESSION: lines and tubes as above."]
    assert agree_with_flags(twice, flags[:1] & [False, True, False, False, False], NAMES, mined, "add") == [
        "FINDINGS: normal heart size. small right pneumothorax.\n"
        "IMPRESSION: lines and tubes as above. small right pneumothorax."]
    assert added[1:] == drafts[1:]   # nothing flagged is missing: left as drafted
    exact = agree_with_flags(drafts, flags, NAMES, mined, "exact")
    assert exact[0] == added[0]
    assert exact[1] == "FINDINGS: normal heart size.\nIMPRESSION: no acute cardiopulmonary process."
    assert exact[2] == "FINDINGS: pulmonary edema.\nIMPRESSION: pulmonary edema."
    # a finding the head never flags is its LM's to state: exact leaves those sentences
    assert agree_with_flags(drafts, flags, NAMES, mined, "exact", abstain=["Pneumothorax"])[2] == drafts[2]
    read = _stated(exact)[:, :3]
    assert (read == flags[:, :3]).all(), exact
    assert (_stated(added)[:, :3] >= flags[:, :3]).all()
    assert all("FINDINGS:" in d and "\nIMPRESSION:" in d for d in added + exact)
    empty = ["FINDINGS: Not stated.\nIMPRESSION: no acute cardiopulmonary process."]   # a section the LM left empty
    assert agree_with_flags(empty, flags[:1] & [False, True, False, False, False], NAMES, mined, "add") == [
        "FINDINGS: small right pneumothorax.\nIMPRESSION: small right pneumothorax."]
    cut = ["FINDINGS: normal heart size. moderate left pleural eff\nIMPRESSION: no acute cardiopulmonary process."]
    assert agree_with_flags(cut, flags[:1] & [False, True, False, False, False], NAMES, mined, "add") == [
        "FINDINGS: normal heart size. small right pneumothorax.\nIMPRESSION: small right pneumothorax."]
    # a finding no mined sentence states is left as the draft has it
    lone = np.array([[True, False, False, False, False]])
    assert agree_with_flags(drafts[:1], lone, NAMES, mined, "add") == drafts[:1]
    with pytest.raises(ValueError, match="flag agreement mode"):
        agree_with_flags(drafts, flags, NAMES, mined, "always")
    assert agree_with_flags(drafts, torch.as_tensor(flags), NAMES, mined, "exact") == exact   # flags as a tensor


def test_draft_batch_states_the_flags_it_was_given(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from medfuse_core.config import ConfigError, DecodingSettings, ReportConfig, VisionConfig
    from medfuse_core.evaluation.report_inference import decoding_settings, draft_batch
    from medfuse_core.models.report import ReportGenerator
    from medfuse_core.models.tiny_lm import save_tiny_causal_lm
    from medfuse_core.models.vision import build_vision_encoder
    from medfuse_core.objectives.report_generation import report_tokenizer

    lm_dir = save_tiny_causal_lm(tmp_path / "llama", "llama", hidden=32, layers=1, heads=2)
    torch.manual_seed(0)
    model = ReportGenerator(build_vision_encoder(VisionConfig(name="resnet18"), 32, load_weights=False),
                            AutoModelForCausalLM.from_pretrained(lm_dir), guide_labels=NAMES).eval()
    tokenizer = report_tokenizer(str(lm_dir))
    flags = torch.tensor([[True, True, True, False, False], [False] * 4 + [True]])
    images = torch.randn(2, 1, 32, 32)
    mined = mine_flag_sentences(REPORTS, NAMES, style=str.lower)
    bundle = SimpleNamespace(model=model, tokenizer=tokenizer, extra={"flag_sentences": mined}, image_size=32)
    drafts = draft_batch(bundle, images, None, DecodingSettings(max_new_tokens=8, flag_agreement="exact"), flags=flags)
    assert (_stated(drafts)[:, :4] == flags[:, :4].numpy()).all(), drafts
    # the findings a model never flags (threshold NEVER_FLAG) are left as drafted
    from medfuse_core.evaluation.metrics import NEVER_FLAG
    from medfuse_core.evaluation.report_inference import state_flags

    draft = ["FINDINGS: small right pneumothorax. pulmonary edema.\nIMPRESSION: pulmonary edema."]
    only_edema = np.array([[False, False, True, False, False]])
    silent = {"flag_sentences": mined, "guide_thresholds": {"Pneumothorax": NEVER_FLAG, "Edema": 0.4}}
    assert state_flags(draft, only_edema, NAMES, silent, "exact") == draft
    assert "pneumothorax" not in state_flags(draft, only_edema, NAMES, {"flag_sentences": mined}, "exact")[0]
    bundle.extra = {}   # a model trained before the sentences were kept
    with pytest.raises(ConfigError, match="decoding.flag_agreement"):
        draft_batch(bundle, images, None, DecodingSettings(max_new_tokens=8, flag_agreement="add"), flags=flags)
    with pytest.raises(ConfigError, match="decoding.flag_agreement"):   # the CLI's check, before any work
        decoding_settings(bundle, ["decoding.flag_agreement=exact"])
    assert decoding_settings(bundle, ["decoding.flag_agreement=none"]).flag_agreement == "none"
    with pytest.raises(ValueError, match="decoding.flag_agreement"):
        ReportConfig.model_validate({"model": {"guidance": {"enabled": False}}, "decoding": {"flag_agreement": "add"}})
