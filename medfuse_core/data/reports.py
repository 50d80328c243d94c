"""Free-text radiology report parsing (MIMIC-CXR style) and the classifier's clinical context.

The diagnosis classifier may read the referring clinician's indication/history, never the
radiologist's read (findings, impression, wet read, addenda), which is what the labels were
extracted from. Real archives write reports in many layouts, all handled here::

                                     FINAL REPORT                 (standard, MIMIC-CXR)
     INDICATION:  ___M with shortness of breath
     COMPARISON:  None.
     FINDINGS:
     PA and lateral views of the chest ...
     IMPRESSION:
     No acute cardiopulmonary process.

     REASON FOR EXAMINATION:  Evaluation of the patient with SOB.   (old style: no FINDINGS/
                                                                   IMPRESSION headers)
     Portable AP radiograph of the chest was reviewed ...

     Large right pleural effusion has increased.

     INDICATION: cough. FINDINGS: Right lower lobe pneumonia.      (header mid-line)
     INDICATION fever                                              (headers without a colon)
     FINDINGS
     Left lower lobe consolidation.
     WET READ: ___ 10:41 PM  No pneumothorax.                      (wet read, addendum)

Section rules, after the public MIT-LCP ``mimic-cxr`` ``txt/section_parser.py`` conventions
(a table of section names and synonyms, normalised to a few keys; text before the first
header is the "preamble"; a report without FINDINGS/IMPRESSION headers gets its final
paragraph as "last_paragraph", the text the CheXpert labeler read for such reports):

* A header is a name from :data:`SECTION_ALIASES` (any spacing) or, at the start of a line,
  another upper-case phrase of at most six words followed by a colon ("CHEST, TWO VIEWS:").
  Known headers are recognised
  - at the start of a line, in any case, followed by a colon;
  - at the start of a line without a colon when they stand alone on the line (upper or
    title case) or, written in upper case, are followed by text ("FINDINGS Left ...");
  - mid-line, followed by a colon, when written in upper or title case
    ("cough. FINDINGS: ...", "eval. Findings: ...");
  - mid-line without a colon for the radiologist sections (FINDINGS, IMPRESSION, CONCLUSION,
    WET READ, ADDENDUM, COMPARISON, TECHNIQUE ...) written in upper case before a capitalised
    word, a digit, "___" or the line end ("fever FINDINGS Left lower lobe ..."). In an
    all-capitals report this may cut an indication short ("EVAL FOR ACUTE FINDINGS"): the
    parser prefers losing context words to leaking the read.
* A "FINAL REPORT" / "PRELIMINARY REPORT" banner line ends the current section (a wet read
  written above the banner does not run into the report).
* The short sections (indication, comparison, technique, examination) hold one paragraph:
  they end at the first blank line (leading blank lines after a bare header are skipped) or
  at the next header. Unheaded text after them is the radiologist's body and counts as
  "findings". The other sections run to the next header, across paragraphs.
* A report with no header at all is all "findings".

Context check (:func:`clinical_context_checked`). The indication is dropped when it holds
more than :data:`MAX_CONTEXT_WORDS` words ("dropped_long") or a radiologist finding statement
("dropped_findings"). Indications routinely *name* findings as clinical questions or history
("eval for pneumonia", "r/o pneumothorax", "?CHF", "assess for effusion", "history of lung
cancer", "s/p chest tube for pneumothorax"); those are kept. The rule, applied per sentence
(split at ``. ; ! ?`` + space and at ``//``), in the spirit of CheXpert's mention / negation /
uncertainty phrases:

1. *Read-only language* no clinician writes in an indication makes it a finding statement,
   even beside a question: study description ("views of the chest", "radiograph ... was
   obtained/reviewed"), cross-references and advice ("as above", "as described", "again
   noted", "recommend", "clinical correlation"), "in standard position", "was discussed with".
2. Otherwise a sentence with a *question cue* ("?", eval/evaluate, assess, r/o, rule out,
   question of, concern for, look for) is a clinical question: never a finding statement.
   Comparison with a prior ("unchanged", "no interval change", "compared to prior", "in
   comparison with") is a finding statement whatever it names.
3. Otherwise it needs a *finding mention* (CheXpert-style phrases: effusion, pneumothorax,
   consolidation, opacity, edema, atelectasis, heart, cardiac silhouette, mediastinum, lungs,
   nodule, mass, pneumonia, fracture, tubes/lines ...) and
   - a *hard assertion*: "there is/are", a copula with a read word ("is seen/noted/present/
     normal/clear/enlarged/unchanged/increased ..."), "has increased/resolved ...",
     "consistent/compatible with", "may/likely represent", "in standard position",
     "terminates", "projects over", "tip/leads in the", "cannot exclude", "no evidence of",
     "unremarkable", or a sentence opening with "No" ("No pneumothorax."); or
   - a *soft assertion* (severity words small/moderate/large/mild/trace ..., "no"/"without",
     normal, clear, enlarged, widened, blunting, seen/noted, shows/demonstrates, appears,
     descriptors such as multiple/linear/plate-like/rounded, a size "2.1 cm")
     *and no history cue* (h/o, history, hx, known, s/p, status post, recent, f/u,
     follow-up, "___M with ...", "patient with ...").

A bare noun ("pneumothorax", "right lower lobe pneumonia") is ambiguous and kept: the section
parser is the primary defence, the check is the second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Header (upper-case, single spaces) -> normalised section key.
SECTION_ALIASES: dict[str, str] = {
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "CLINICAL INDICATION": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "PATIENT HISTORY": "indication",
    "CLINICAL INFORMATION": "indication",
    "REASON FOR EXAMINATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR STUDY": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "COMPARISON EXAM": "comparison",
    "COMPARISON FILM": "comparison",
    "REFERENCE EXAM": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "TYPE OF EXAMINATION": "examination",
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "WET READ": "wet_read",
    "WETREAD": "wet_read",
    "ADDENDUM": "addendum",
    "NOTIFICATION": "notification",
    "RECOMMENDATION": "recommendations",
    "RECOMMENDATIONS": "recommendations",
    "RECOMMENDATION(S)": "recommendations",
    "COMMENT": "comment",
    "COMMENTS": "comment",
}

#: The section that is the classifier's text; every other section is radiologist-written.
CONTEXT_SECTION = "indication"
#: An indication longer than this many words is dropped ("dropped_long").
MAX_CONTEXT_WORDS = 40
#: The statuses :func:`clinical_context_checked` returns.
CONTEXT_STATUSES = ("ok", "none", "dropped_long", "dropped_findings")

# Sections that hold one paragraph; unheaded text after them is the radiologist's body.
_PARAGRAPH_SECTIONS = frozenset({"indication", "comparison", "technique", "examination"})
# Known headers that may stand mid-line without a colon (radiologist-written sections only).
_BARE_MIDLINE = tuple(h for h, k in SECTION_ALIASES.items()
                      if k in ("findings", "impression", "wet_read", "addendum", "comparison", "technique")
                      and "/" not in h)
# Words in an unknown header that give its section (as section_parser.py does).
_MAIN_WORDS = (("IMPRESSION", "impression"), ("FINDING", "findings"), ("HISTORY", "indication"),
               ("INDICATION", "indication"), ("COMPARISON", "comparison"), ("ADDENDUM", "addendum"),
               ("WET READ", "wet_read"))
_FINDINGS_LIKE = re.compile(r"\b(CHEST|PORTABLE|PA AND LAT\w*|AP AND LAT\w*|LATERAL AND [AP]A|FRONTAL|"
                            r"TWO VIEWS|ONE VIEW|[AP]A VIEW|LATERAL VIEW|RIBS)\b")


def _alt(headers) -> str:
    parts = (r"[ \t]+".join(re.escape(w) for w in h.split(" ")) for h in headers)
    return "|".join(sorted(parts, key=len, reverse=True))


_KNOWN = _alt(SECTION_ALIASES)
_LINE_COLON = re.compile(rf"^[ \t]*(?P<h>{_KNOWN})[ \t]*:", re.IGNORECASE)
_LINE_ALONE = re.compile(rf"^[ \t]*(?P<h>{_KNOWN})[ \t]*$", re.IGNORECASE)
_LINE_TEXT = re.compile(rf"^[ \t]*(?P<h>{_KNOWN})[ \t]+(?=\S)")  # upper case as written
_LINE_OTHER = re.compile(r"^[ \t]*(?P<h>[A-Z][A-Z'()/&,-]*(?:[ \t]+[A-Z'()/&,-]+){0,5})[ \t]*:")
_MID_COLON = re.compile(rf"(?<![\w/])(?P<h>{_KNOWN})[ \t]*:", re.IGNORECASE)
_MID_BARE = re.compile(rf"(?<=\S)[ \t]+(?P<h>{_alt(_BARE_MIDLINE)})(?=[ \t]+[A-Z0-9_(\[]|[ \t]*$)")
_BANNER = re.compile(r"^[ \t]*(?:FINAL|PRELIMINARY|PRELIM)[ \t]+REPORT[ \t]*$", re.IGNORECASE)


def _header_case(word: str) -> bool:
    """Upper case ("FINDINGS") or capitalised ("Findings", "Reason for exam")."""
    letters = [c for c in word if c.isalpha()]
    return bool(letters) and (all(c.isupper() for c in letters)
                              or (letters[0].isupper() and all(c.islower() for c in letters[1:]))
                              or word.istitle())


def _normalise_key(header: str) -> str:
    upper = " ".join(header.upper().split())
    if upper in SECTION_ALIASES:
        return SECTION_ALIASES[upper]
    for word, key in _MAIN_WORDS:
        if word in upper:
            return key
    if _FINDINGS_LIKE.search(upper):
        return "findings"
    return re.sub(r"[^a-z]+", "_", upper.lower()).strip("_")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _split_line(line: str) -> list[tuple[str | None, str]]:
    """A line as ``[(header key or None, text), ...]``; None: text continuing the current section."""
    out: list[tuple[str | None, str]] = []
    rest = line
    m = _LINE_COLON.match(line)
    if m is None:
        m = _LINE_ALONE.match(line)
        if m is not None and not _header_case(m.group("h")):
            m = None
    if m is None:
        m = _LINE_TEXT.match(line)
        if m is not None and not m.group("h").isupper():
            m = None
    if m is None:
        m = _LINE_OTHER.match(line)
    if m is not None:
        out.append((_normalise_key(m.group("h")), ""))
        rest = line[m.end():]
    # mid-line headers in the rest of the line
    cuts = []
    for mm in _MID_COLON.finditer(rest):
        if _header_case(mm.group("h")):
            cuts.append((mm.start("h"), mm.end(), mm.group("h")))
    for mm in _MID_BARE.finditer(rest):
        cuts.append((mm.start("h"), mm.end(), mm.group("h")))
    cuts.sort()
    pos = 0
    for start, end, header in cuts:
        if start < pos:  # overlapping match (e.g. a bare header followed by its colon)
            continue
        _append_text(out, rest[pos:start])
        out.append((_normalise_key(header), ""))
        pos = end
    _append_text(out, rest[pos:])
    return out


def _append_text(out: list, text: str) -> None:
    if not text.strip():
        return
    if out:
        key, prev = out[-1]
        out[-1] = (key, f"{prev} {text}" if prev else text)
    else:
        out.append((None, text))


@dataclass
class _Part:
    key: str
    headed: bool
    paragraphs: list = field(default_factory=lambda: [[]])
    started: bool = False
    closed: bool = False

    def text(self) -> str:
        return _clean(" ".join(" ".join(p) for p in self.paragraphs))


def _parse(text: str) -> tuple[list[_Part], bool]:
    parts: list[_Part] = []
    seen_header = False
    cur: _Part | None = None
    for line in text.splitlines():
        if not line.strip():
            if cur is not None:
                if cur.paragraphs[-1]:
                    cur.paragraphs.append([])
                if cur.key in _PARAGRAPH_SECTIONS and cur.headed and cur.started:
                    cur.closed = True
            continue
        if _BANNER.match(line):
            cur = None
            continue
        for key, body in _split_line(line):
            if key is not None:
                seen_header = True
                cur = _Part(key, headed=True)
                parts.append(cur)
            if not body.strip():
                continue
            if cur is None or cur.closed:
                cur = _Part("findings" if seen_header else "_lead", headed=False)
                parts.append(cur)
            cur.paragraphs[-1].append(body)
            cur.started = True
    return parts, seen_header


def extract_sections(text: str) -> dict[str, str]:
    """Split a report into ``{section_key: text}`` with whitespace collapsed.

    Keys are lower-case: "indication" (also HISTORY, CLINICAL HISTORY, REASON FOR
    EXAMINATION ...), "comparison", "technique", "examination", "findings" (also unheaded
    body text), "impression" (also CONCLUSION), "wet_read", "addendum", "notification",
    "recommendations", or the snake-cased name of another upper-case header. A key seen twice
    gets both texts joined by a space. Text before the first header (other than the
    "FINAL REPORT" banner) is "preamble"; a report without any header is all "findings".
    When no FINDINGS/IMPRESSION header is present, the final paragraph of the unheaded body is
    also given (a copy) as "last_paragraph". Empty sections are dropped.
    """
    if not text:
        return {}
    parts, seen_header = _parse(text)
    sections: dict[str, str] = {}

    def add(key: str, body: str) -> None:
        if body:
            sections[key] = f"{sections[key]} {body}" if key in sections else body

    for part in parts:
        key = part.key if part.key != "_lead" else ("preamble" if seen_header else "findings")
        add(key, part.text())
    if not any(p.headed and p.key in ("findings", "impression") for p in parts):
        body = [par for p in parts if not p.headed and (p.key == "findings" or not seen_header)
                for par in p.paragraphs if par]
        if body and (seen_header or len(body) > 1):
            sections["last_paragraph"] = _clean(" ".join(body[-1]))
    return sections


# ---------------------------------------------------------------------------- context check

_MENTION = re.compile(
    r"\b(?:effusions?|pleural|pneumothora(?:x|ces)|ptx|hydro\w*|consolidat\w*|opacit(?:y|ies)|opacifi\w*|"
    r"infiltrat\w*|o?edema|congesti\w*|atelecta\w*|cardiomegaly|heart|cardiac|cardiomediastinal|"
    r"cardiopulmonary|intrathoracic|mediastin\w*|hil(?:um|ar|a)|lungs?|lobes?|lobar|lingula\w*|"
    r"(?:bi)?basilar|bases|apex|apical|nodul\w*|mass(?:es)?|lesions?|pneumonia|fractur\w*|costophrenic|"
    r"(?:hemi)?diaphragm\w*|silhouette|airspace|air bronchograms?|aort\w*|emphysema|hyperinfla\w*|"
    r"granulomas?|calcifi\w*|scarring|fibrosis|tubes?|lines?|catheters?|pacemaker|pacer|leads|ett|ng|"
    r"picc|drains?|wires?|clips?|devices?|sternotomy|svc|carina|stomach|osseous|bony|soft tissues?)\b",
    re.IGNORECASE)
_QUESTION = re.compile(
    r"\?|\beval\w*|\bassess\w*|\br/o\b|\brul(?:e[ds]?|ing)\s+out\b|\bquestion\s+of\b|"
    r"\bconcern(?:ed)?\s+(?:for|about)\b|\blook(?:ing)?\s+for\b|\bworr(?:y|ied)\b",
    re.IGNORECASE)
_HISTORY = re.compile(
    r"\bh/o\b|\bhx\b|\bhistory\b|\bknown\b|\bs/p\b|\bstatus\s+post\b|\brecent(?:ly)?\b|\bf/u\b|"
    r"\bfollow[\s-]?up\b|\bsuspect(?:ed)?\b|"
    r"(?:___\s*[mf]?|\b(?:man|woman|male|female|patient|pt|gentleman|lady|boy|girl|yo|y/o|y\.o\.|old))"
    r"\s+(?:with|w/)(?!\w)",
    re.IGNORECASE)
# Read language no clinician writes in an indication: a finding statement even beside a question.
_READ_ONLY = re.compile(
    r"\bviews?\s+of\s+the\s+chest\b|\bradiographs?\s+of\s+the\s+chest\b|"
    r"\b(?:views?|radiographs?|films?|images?|study|exam)\s+(?:of\s+the\s+chest\s+)?"
    r"(?:was|were|is|are)\s+(?:reviewed|obtained|provided|performed|submitted)\b|"
    r"\bas\s+(?:above|described)\b|\brecommend\w*|\bclinical\s+correlation\b|\bagain\s+(?:noted|seen|demonstrated)\b|"
    r"\b(?:was|were)\s+(?:discussed|communicated)\b|\bdiscussed\s+with\s+dr\b|"
    r"\bin\s+(?:standard|satisfactory|appropriate|good|unchanged|expected)\s+position\b",
    re.IGNORECASE)
# Comparison with a prior study: a finding statement unless it is asked ("eval for interval change").
_STRONG = re.compile(
    r"\bunchanged\b|\bno\s+(?:significant\s+|substantial\s+|appreciable\s+)?(?:interval\s+)?change\b|"
    r"\binterval(?:ly)?\s+(?:increase|decrease|improve|worsen|resolution|resolved|development|developed|"
    r"change|placement|removal|progression)\w*|\bcompared\s+(?:to|with)\s+(?:the\s+)?(?:prior|previous|"
    r"preceding|recent)\b|\bin\s+comparison\s+(?:to|with)\b",
    re.IGNORECASE)
_HARD = re.compile(
    r"^\W*no\b|\bthere\s+(?:is|are|was|were|has\s+been|have\s+been)\b|"
    r"\b(?:is|are|was|were|remains?)\s+(?:again\s+|now\s+|still\s+|also\s+|otherwise\s+|not\s+)?"
    r"(?:seen|noted|present|identified|visuali[sz]ed|demonstrated|appreciated|unchanged|stable|normal|"
    r"enlarged|clear|increased|decreased|improved|worse|worsened|resolved|new|well|within|top\s+normal|"
    r"likely|probably|consistent|compatible|intact|unremarkable|expanded|widened|in\s+(?:standard|"
    r"satisfactory|appropriate|good|unchanged|expected)\s+position)\b|"
    r"\b(?:has|have)\s+(?:increased|decreased|improved|worsened|resolved|progressed|developed|enlarged)\b|"
    r"\b(?:consistent|compatible)\s+with\b|\b(?:likely|may|might|could|probably)\s+(?:represent|reflect)\w*|"
    r"\brepresents?\b|\b(?:standard|satisfactory|appropriate|good|expected)\s+position\b|\bterminat\w*|"
    r"\bprojects?\s+(?:over|at|in|into|below|above|within|to)\b|"
    r"\bcourses?\s+(?:below|through|into|along|over|across|to|toward|inferiorly|superiorly)\b|"
    r"\btips?\s+(?:is\s+|are\s+)?(?:in|at|over|within|projects|terminates)\b|"
    r"\b(?:cannot|can\s+not|can't)\s+(?:be\s+excluded|exclude)\b|\bnot\s+(?:be\s+)?excluded\b|\bno\s+evidence\b|"
    r"\b(?:leads?|tips?)\s+(?:in|at|over|within)\s+the\b|"
    r"\bunremarkable\b|\bwithin\s+normal\s+limits\b",
    re.IGNORECASE)
_SOFT = re.compile(
    r"\b(?:small|moderate|large|mild|mildly|severe|trace|tiny|minimal|massive|extensive|subtle|patchy|"
    r"dense|focal|layering|blunting|no|without|normal|clear|enlarged|widened|widening|intact|seen|noted|"
    r"shows?|showing|demonstrat\w*|reveal\w*|appear\w*|possible|possibly|probable|questionable|multiple|"
    r"largest|linear|plate-like|rounded|lobulated|scattered|streaky|hazy|\d+(?:\.\d+)?\s*(?:cm|mm))\b",
    re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.;!?])\s+|\s*//+\s*")


def _is_finding_statement(sentence: str) -> bool:
    if _READ_ONLY.search(sentence):
        return True
    if _QUESTION.search(sentence):
        return False
    if _STRONG.search(sentence):
        return True
    if not _MENTION.search(sentence):
        return False
    if _HARD.search(sentence):
        return True
    return bool(_SOFT.search(sentence)) and not _HISTORY.search(sentence)


def finding_statements(text: str) -> list[str]:
    """The sentences of ``text`` that read as radiologist finding statements (see the module doc)."""
    return [s for s in (x.strip() for x in _SENTENCE.split(text or "")) if s and _is_finding_statement(s)]


def clinical_context_checked(text: str) -> tuple[str, str]:
    """``(context, status)``: the report's indication/history text and why it is or is not used.

    status "ok": context is the indication; "none": the report has no indication;
    "dropped_findings": the indication holds a radiologist finding statement;
    "dropped_long": it is longer than :data:`MAX_CONTEXT_WORDS` words. Context is "" unless "ok".
    """
    ctx = extract_sections(text).get(CONTEXT_SECTION, "")
    if not ctx:
        return "", "none"
    if finding_statements(ctx):
        return "", "dropped_findings"
    if len(ctx.split()) > MAX_CONTEXT_WORDS:
        return "", "dropped_long"
    return ctx, "ok"


def clinical_context(text: str) -> str:
    """The referring clinician's INDICATION/history text, or "" when the report has none.

    Never includes findings, impression or any other radiologist-written section, and is ""
    when the indication itself reads as a radiologist's finding or is too long (see
    :func:`clinical_context_checked`), so it is safe as the text input of a diagnosis classifier.
    """
    return clinical_context_checked(text)[0]
