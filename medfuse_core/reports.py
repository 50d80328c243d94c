"""Free-text radiology report parsing (MIMIC-CXR style).

Reports look like::

                                     FINAL REPORT
     INDICATION:  ___M with shortness of breath

     COMPARISON:  None.

     FINDINGS:
     PA and lateral views of the chest ...

     IMPRESSION:
     No acute cardiopulmonary process.

A section starts at a line whose first non-blank text is a header followed by a colon:
either a known header (matched case-insensitively, see :data:`SECTION_ALIASES`) or any
other short upper-case phrase ("WET READ:", "NOTIFICATION:"). Text after the colon on
the header line belongs to the section.
"""

from __future__ import annotations

import re

# Header (upper-case, as written) -> normalised section key.
SECTION_ALIASES: dict[str, str] = {
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "CLINICAL INDICATION": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "CLINICAL INFORMATION": "indication",
    "REASON FOR EXAMINATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR STUDY": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
}

_KNOWN = "|".join(sorted((re.escape(h) for h in SECTION_ALIASES), key=len, reverse=True))
# A known header in any case, or another upper-case phrase of at most six words.
_HEADER = re.compile(
    rf"^[ \t]*(?:(?P<known>(?i:{_KNOWN}))|(?P<other>[A-Z][A-Z'()/&-]*(?:[ \t]+[A-Z'()/&-]+){{0,5}}))"
    r"[ \t]*:",
    re.MULTILINE,
)
_FINAL_REPORT = re.compile(r"^\s*FINAL REPORT\s*$", re.MULTILINE)


def _normalise_key(header: str) -> str:
    upper = " ".join(header.upper().split())
    if upper in SECTION_ALIASES:
        return SECTION_ALIASES[upper]
    return re.sub(r"[^a-z]+", "_", upper.lower()).strip("_")


def _clean(text: str) -> str:
    return " ".join(text.split())


def extract_sections(text: str) -> dict[str, str]:
    """Split a report into ``{section_key: text}`` with whitespace collapsed.

    Keys are lower-case ("indication", "comparison", "findings", "impression", ...);
    HISTORY / CLINICAL HISTORY / REASON FOR EXAMINATION map to "indication". A key seen
    twice gets both texts joined by a space. Text before the first header (other than
    the "FINAL REPORT" banner) is returned under "preamble" when not empty. Empty
    sections are dropped.
    """
    if not text:
        return {}
    matches = list(_HEADER.finditer(text))
    sections: dict[str, str] = {}

    def add(key: str, body: str) -> None:
        body = _clean(body)
        if not body:
            return
        sections[key] = f"{sections[key]} {body}" if key in sections else body

    head = text[: matches[0].start()] if matches else text
    add("preamble", _FINAL_REPORT.sub(" ", head))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        key = _normalise_key(m.group("known") or m.group("other"))
        add(key, text[m.end() : end])
    return sections


def clinical_context(text: str) -> str:
    """The referring clinician's INDICATION/history text, or "" when the report has none.

    Never includes findings, impression or any other radiologist-written section, so it
    is safe as the text input of a diagnosis classifier.
    """
    return extract_sections(text).get("indication", "")
