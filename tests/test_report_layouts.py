"""Every report layout the synthetic corpus writes: the classifier's context is the indication only.

The planner reports which sentences it wrote as the radiologist's read (view, findings,
impression, wet read, addendum); none of them may reach the context, on any layout.
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np
import pytest

from medfuse_core.data import synth
from medfuse_core.data.reports import clinical_context, clinical_context_checked, extract_sections

LAYOUTS = tuple(synth.REPORT_LAYOUTS)
VIEWS = ("Portable semi-upright AP view of the chest.", "PA and lateral views of the chest provided.",
         "Single PA view of the chest.")
COMPARISONS = ("None.", "___.", "Chest radiograph ___.", "Prior study from ___.")


def _norm(text: str) -> str:
    """Whitespace collapsed, and textwrap's hyphen breaks ("Left-\\n sided") rejoined."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def _study_inputs(seed: int):
    """The planner's inputs for one random study, drawn as ``_plan_corpus`` draws them."""
    rng = np.random.default_rng([seed, 77])
    state = synth._sample_state(rng)
    spec = synth._sample_spec(rng, state)
    sex = "M" if seed % 2 else "F"
    indication, groups = synth._indication(rng, state, sex)
    return rng, state, spec, VIEWS[seed % 3], COMPARISONS[seed % 4], indication, groups


def _plan(seed: int, layout: str | None):
    rng, state, spec, view_text, comparison, indication, groups = _study_inputs(seed)
    return synth._plan_report_parts(rng, state, spec, view_text, comparison, indication, groups, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_radiologist_sentence_reaches_context(layout):
    for seed in range(60):
        _, report, parts = _plan(seed, layout)
        assert parts.layout == layout
        ctx, status = clinical_context_checked(report)
        nctx = _norm(ctx)
        for sentence in parts.radiologist:
            assert _norm(sentence) not in nctx, (layout, sentence, report)
        # and nothing else either: the context is exactly the indication that was written
        if parts.indication:
            want = _norm(parts.indication)
            assert status == "ok", (layout, status, report)
            assert nctx in (want, re.sub(r"^History:\s*", "", want)), (layout, ctx, report)
        else:
            assert (ctx, status) == ("", "none"), report
        assert clinical_context(report) == ctx
        # every radiologist sentence is still found, in a radiologist section
        sections = extract_sections(report)
        read = _norm(" ".join(v for k, v in sections.items() if k != "indication"))
        for sentence in parts.radiologist:
            assert _norm(sentence) in read, (layout, sentence, sections)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_findings_and_impression_sections_recovered(layout):
    """Findings and impression sentences land in "findings"/"impression" (old style: unheaded body)."""
    for seed in range(20):
        _, report, parts = _plan(seed, layout)
        sections = extract_sections(report)
        body = _norm(sections.get("findings", "") + " " + sections.get("impression", ""))
        view = parts.radiologist[0]
        assert _norm(view) in body, (layout, report)
        if layout == "old_style":
            assert "impression" not in sections and sections["last_paragraph"], sections
        if layout == "wet_read":
            assert sections["wet_read"]
        if layout == "addendum":
            assert sections["addendum"]


def test_layout_does_not_change_labels_or_other_draws():
    """The layout comes from a generator derived from the study's rng; the rng itself is not touched."""
    for seed in range(30):
        outcomes = []
        for layout in LAYOUTS:
            rng, state, spec, view_text, comparison, indication, groups = _study_inputs(seed)
            labels, _, _ = synth._plan_report_parts(rng, state, spec, view_text, comparison, indication, groups,
                                                    layout=layout)
            outcomes.append(([None if math.isnan(v) else v for v in labels.values()], rng.random()))
        assert all(o == outcomes[0] for o in outcomes), seed


def test_plan_report_keeps_its_signature_and_matches_parts():
    rng, state, spec, view_text, comparison, indication, groups = _study_inputs(3)
    labels, report = synth._plan_report(rng, state, spec, view_text, comparison, indication, groups)
    rng2, *rest = _study_inputs(3)
    labels2, report2, parts = synth._plan_report_parts(rng2, *rest)
    assert report == report2 and list(labels) == list(labels2) and parts.layout in LAYOUTS


def test_every_layout_occurs_in_a_200_study_corpus(monkeypatch):
    seen = []
    real = synth._plan_report_parts

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[2].layout)
        return out

    monkeypatch.setattr(synth, "_plan_report_parts", spy)
    studies = synth._plan_corpus(200, 0)
    assert len(seen) == len(studies) == 200
    counts = collections.Counter(seen)
    assert set(counts) == set(LAYOUTS), counts
    assert counts["standard"] / 200 > 0.4 and counts["standard"] == max(counts.values()), counts
    # the whole corpus: the context is never radiologist text, and nearly every study has one
    statuses = collections.Counter(clinical_context_checked(s.report)[1] for s in studies)
    assert statuses["ok"] == 200 - counts["no_indication"] and statuses["none"] == counts["no_indication"], statuses


def test_layouts_are_deterministic():
    a = [s.report for s in synth._plan_corpus(40, 5)]
    b = [s.report for s in synth._plan_corpus(40, 5)]
    assert a == b


def test_unknown_layout_rejected():
    with pytest.raises(ValueError):
        _plan(0, "free_verse")
