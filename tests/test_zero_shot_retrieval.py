"""Stage-1 evaluation: image<->report retrieval recall and zero-shot CheXpert classification."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medfuse_core.evaluation import zero_shot
from medfuse_core.evaluation.retrieval import recall_at_k
from medfuse_core.evaluation.zero_shot import (CHEXPERT_LABELS, PromptError, load_prompts, zero_shot_metrics,
                                               zero_shot_scores)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PROMPTS = REPO / "experiments" / "prompts" / "cxr_zero_shot.yaml"


def _orthonormal(n: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, n)))
    return q.T  # [n, d], orthonormal rows


def _reference_ranks(queries, candidates, keys=None):
    """Naive O(N^2) rank with an explicit pessimistic sort (non-matching first among equals)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        sims = [float(np.dot(q[i], c[j])) for j in range(len(c))]
        match = [(j == i) if keys is None else (keys[j] == keys[i]) for j in range(len(c))]
        order = sorted(range(len(c)), key=lambda j: (-sims[j], match[j]))
        ranks.append(next(pos for pos, j in enumerate(order) if match[j]))
    return np.array(ranks)


# --------------------------------------------------------------------------- retrieval


def test_identity_pairs_give_perfect_recall_both_ways():
    rng = np.random.default_rng(1)
    images = _orthonormal(20, 32)
    texts = images + 0.01 * rng.normal(size=images.shape)
    out = recall_at_k(images, texts)
    assert out == {"image_to_text": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0},
                   "text_to_image": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}, "n": 20}


def test_embeddings_are_normalised_inside():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(30, 16))
    texts = images + 0.3 * rng.normal(size=images.shape)
    base = recall_at_k(images, texts, ks=(1, 3))
    scaled = recall_at_k(images * rng.uniform(0.01, 100, size=(30, 1)),
                         texts * rng.uniform(0.01, 100, size=(30, 1)), ks=(1, 3))
    assert base == scaled


def test_rotated_texts_put_the_partner_at_rank_two():
    # text_j = 0.6 e_j + 0.8 e_{j-1}: image k is closest to text k+1 (0.8), then its own (0.6);
    # text k is closest to image k-1 (0.8), then its own image (0.6).
    n = 20
    e = _orthonormal(n, 24, seed=3)
    texts = 0.6 * e + 0.8 * np.roll(e, 1, axis=0)
    out = recall_at_k(e, texts, ks=(1, 2, 5))
    for direction in ("image_to_text", "text_to_image"):
        assert out[direction] == {"R@1": 0.0, "R@2": 1.0, "R@5": 1.0}


def test_partial_rotation_gives_known_fractions():
    n = 20
    e = _orthonormal(n, 24, seed=4)
    texts = e.copy()
    # Rotate the first 5 texts among themselves (a cycle): those 5 queries miss at R@1,
    # and with no similarity to their partner at all they land at rank >= 1 both ways.
    texts[:5] = np.roll(e[:5], 1, axis=0)
    out = recall_at_k(e, texts, ks=(1,))
    assert out["image_to_text"]["R@1"] == pytest.approx(15 / 20)
    assert out["text_to_image"]["R@1"] == pytest.approx(15 / 20)


def test_duplicate_report_keys_count_as_hits():
    n = 10
    e = _orthonormal(n, 16, seed=5)
    images = e.copy()
    texts = e.copy()
    images[0] = e[1]  # image 0 looks exactly like study 1: retrieves text 1, not its own text 0
    keys = [f"report {i}" for i in range(n)]
    without = recall_at_k(images, texts, ks=(1,))
    assert without["image_to_text"]["R@1"] == pytest.approx(9 / 10)
    keys[0] = keys[1] = "No acute cardiopulmonary process."
    with_keys = recall_at_k(images, texts, ks=(1,), text_keys=keys)
    assert with_keys["image_to_text"]["R@1"] == 1.0
    # text->image: text 1's best images are 0 and 1 (tied), both with its report key -> a hit;
    # text 0 (e0) resembles no image: all similarities tie at 0 and go against it -> a miss
    assert with_keys["text_to_image"]["R@1"] == pytest.approx(9 / 10)
    assert without["text_to_image"]["R@1"] == pytest.approx(8 / 10)  # text 0 and text 1 both miss
    # keys never come back
    assert "No acute" not in repr(with_keys)


def test_ties_are_pessimistic():
    n = 8
    e = _orthonormal(n, 12, seed=6)
    texts = e.copy()
    texts[1] = e[0]  # texts 0 and 1 are identical: images 0 gets a tie with a wrong text
    out = recall_at_k(e, texts, ks=(1, 2))
    # image 0: text 0 ties with text 1 -> rank 1 (miss at R@1, hit at R@2)
    # image 1: its own text 1 = e0 is orthogonal to e1 -> miss at R@1; with every other text
    #          orthogonal too, all N-1 ties go against it -> miss at R@2 as well
    assert out["image_to_text"]["R@1"] == pytest.approx(6 / 8)
    assert out["image_to_text"]["R@2"] == pytest.approx(7 / 8)
    # all-tied query: identical embeddings everywhere -> nobody is a hit below K = N
    same = np.ones((5, 3))
    tied = recall_at_k(same, same, ks=(1, 4, 5))
    assert tied["image_to_text"] == {"R@1": 0.0, "R@4": 0.0, "R@5": 1.0}
    # ...unless all reports share a key
    assert recall_at_k(same, same, ks=(1,), text_keys=["x"] * 5)["text_to_image"]["R@1"] == 1.0


@pytest.mark.parametrize("use_keys", [False, True])
def test_matches_naive_reference_with_ties_and_duplicates(use_keys):
    rng = np.random.default_rng(7)
    n = 60
    images = rng.integers(-2, 3, size=(n, 4)).astype(float)  # small integer vectors: many ties
    images[np.all(images == 0, axis=1)] = 1.0
    texts = images + rng.integers(-1, 2, size=(n, 4))
    texts[np.all(texts == 0, axis=1)] = 1.0
    texts[10] = texts[11]  # exact duplicate rows
    keys = [f"k{v}" for v in rng.integers(0, 15, size=n)] if use_keys else None
    ks = (1, 3, 10)
    out = recall_at_k(images, texts, ks=ks, text_keys=keys, chunk_size=7)
    for direction, q, c in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ranks = _reference_ranks(q, c, keys)
        assert out[direction] == {f"R@{k}": pytest.approx(float(np.mean(ranks < k))) for k in ks}


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(8)
    n = 137
    images = rng.normal(size=(n, 20)).astype(np.float32)
    texts = (images + 0.8 * rng.normal(size=images.shape)).astype(np.float32)
    texts[5] = texts[6]
    keys = [f"r{v}" for v in rng.integers(0, 40, size=n)]
    for k in (None, keys):
        full = recall_at_k(images, texts, ks=(1, 5, 10), text_keys=k, chunk_size=n)
        for chunk in (1, 7, 64, 1000, None):
            assert recall_at_k(images, texts, ks=(1, 5, 10), text_keys=k, chunk_size=chunk) == full


def test_retrieval_input_errors_do_not_echo_keys():
    e = _orthonormal(4, 4)
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k(e, e[:3])
    with pytest.raises(ValueError, match="all-zero"):
        recall_at_k(np.zeros((4, 4)), e)
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(e, e, ks=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        recall_at_k(e, e, chunk_size=0)
    with pytest.raises(ValueError, match="text_keys") as info:
        recall_at_k(e, e, text_keys=["secret report text"] * 3)
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- zero-shot scores


def _zero_shot_corpus(n=40, d=16, seed=0, label_names=("Pleural Effusion", "Cardiomegaly")):
    rng = np.random.default_rng(seed)
    basis = _orthonormal(2 * len(label_names) + 2, d, seed=seed + 100)
    pos_dir = {name: basis[2 * i] for i, name in enumerate(label_names)}
    neg_dir = {name: basis[2 * i + 1] for i, name in enumerate(label_names)}
    y = rng.integers(0, 2, size=(n, len(label_names))).astype(float)
    y[:2] = [1.0, 0.0] if len(label_names) == 2 else 1.0
    y[2:4] = [0.0, 1.0] if len(label_names) == 2 else 0.0
    images = 0.05 * rng.normal(size=(n, d))
    for j, name in enumerate(label_names):
        images += np.where(y[:, j:j + 1] == 1, pos_dir[name], neg_dir[name])
    # three prompts each, scattered around the class direction and not normalised
    pos = {k: (v + 0.1 * rng.normal(size=(3, d))) * rng.uniform(0.5, 3, size=(3, 1)) for k, v in pos_dir.items()}
    neg = {k: (v + 0.1 * rng.normal(size=(3, d))) * rng.uniform(0.5, 3, size=(3, 1)) for k, v in neg_dir.items()}
    return images, pos, neg, y, list(label_names)


def test_aligned_prompts_give_auroc_one_and_swapped_give_zero():
    images, pos, neg, y, names = _zero_shot_corpus()
    scores = zero_shot_scores(images, pos, neg, scale=10.0)
    assert set(scores) == set(names) and all(s.shape == (len(images),) for s in scores.values())
    assert all(np.all((s > 0) & (s < 1)) for s in scores.values())
    m = zero_shot_metrics(scores, y, names)
    assert m["auroc"] == {name: 1.0 for name in names} and m["auroc_macro"] == 1.0
    assert m["n"] == {name: len(images) for name in names} and m["skipped"] == []
    swapped = zero_shot_metrics(zero_shot_scores(images, neg, pos, scale=10.0), y, names)
    assert swapped["auroc"] == {name: 0.0 for name in names} and swapped["auroc_macro"] == 0.0


def test_score_is_the_softmax_over_positive_and_negative_of_the_ensembled_prompts():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(6, 5))
    pos = {"Edema": rng.normal(size=(3, 5))}
    neg = {"Edema": rng.normal(size=(2, 5))}
    scale = 7.5
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cpos = unit(unit(pos["Edema"]).mean(axis=0))
    cneg = unit(unit(neg["Edema"]).mean(axis=0))
    logits = scale * np.stack([unit(images) @ cpos, unit(images) @ cneg], axis=1)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = zero_shot_scores(images, pos, neg, scale=scale)["Edema"]
    np.testing.assert_allclose(got, softmax[:, 0], rtol=1e-12)
    # huge scales stay finite and saturate
    big = zero_shot_scores(images, pos, neg, scale=1e6)["Edema"]
    assert np.all(np.isfinite(big)) and set(np.round(big, 6)) <= {0.0, 1.0}


def test_single_class_labels_are_skipped_and_nan_targets_ignored():
    images, pos, neg, y, names = _zero_shot_corpus(label_names=("Pleural Effusion", "Cardiomegaly", "Fracture"))
    y[:, 2] = 0.0  # Fracture: negatives only
    y[:10, 0] = np.nan  # not scored
    scores = zero_shot_scores(images, pos, neg, scale=5.0)
    # NaN targets are ignored even where the score would be wrong
    scores["Pleural Effusion"][:10] = 1.0 - scores["Pleural Effusion"][:10]
    m = zero_shot_metrics(scores, y, names)
    assert set(m["auroc"]) == {"Pleural Effusion", "Cardiomegaly"}
    assert m["auroc"]["Pleural Effusion"] == 1.0
    assert m["skipped"] == ["Fracture"]
    assert m["n"] == {"Pleural Effusion": len(images) - 10, "Cardiomegaly": len(images), "Fracture": len(images)}
    assert m["auroc_macro"] == 1.0
    # a label column without scores is skipped too; all-NaN gives no AUROC at all
    m2 = zero_shot_metrics({"Fracture": scores["Fracture"]}, y, names)
    assert m2["auroc"] == {} and math.isnan(m2["auroc_macro"])
    assert m2["skipped"] == ["Pleural Effusion", "Cardiomegaly", "Fracture"]


def test_zero_shot_input_errors():
    images, pos, neg, y, names = _zero_shot_corpus()
    with pytest.raises(ValueError, match="same labels"):
        zero_shot_scores(images, pos, {names[0]: neg[names[0]]})
    with pytest.raises(ValueError, match="dimension"):
        zero_shot_scores(images[:, :8], pos, neg)
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        zero_shot_metrics(zero_shot_scores(images, pos, neg), np.full_like(y, -1.0), names)
    with pytest.raises(ValueError, match="no target column"):
        zero_shot_metrics({"Edema": np.zeros(len(images))}, y, names)


# --------------------------------------------------------------------------- prompt files


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    return path


def test_shipped_prompt_file_covers_all_labels():
    assert zero_shot.default_prompts_path() == SHIPPED_PROMPTS.resolve()
    prompts = load_prompts(SHIPPED_PROMPTS)
    assert sorted(prompts) == sorted(CHEXPERT_LABELS) and len(prompts) == 14
    for label, entry in prompts.items():
        assert set(entry) == {"positive", "negative"}
        assert 2 <= len(entry["positive"]) <= 4 and 2 <= len(entry["negative"]) <= 4, label
        assert not set(entry["positive"]) & set(entry["negative"]), label
    assert "No acute cardiopulmonary process." in prompts["No Finding"]["positive"]


def test_prompt_embeddings_feed_the_scores():
    prompts = load_prompts(SHIPPED_PROMPTS)
    rng = np.random.default_rng(0)
    table: dict[str, np.ndarray] = {}

    def encode(texts):
        return np.stack([table.setdefault(t, rng.normal(size=8)) for t in texts])

    pos, neg = zero_shot.prompt_embeddings(prompts, encode)
    assert set(pos) == set(neg) == set(CHEXPERT_LABELS)
    assert pos["Pleural Effusion"].shape == (len(prompts["Pleural Effusion"]["positive"]), 8)
    scores = zero_shot_scores(rng.normal(size=(5, 8)), pos, neg, scale=20.0)
    assert set(scores) == set(CHEXPERT_LABELS)


def test_a_valid_subset_file_loads(tmp_path):
    path = _write(tmp_path, "version: 1\nlabels:\n  Pneumothorax:\n    positive: [' There is a pneumothorax. ']\n"
                            "    negative: [No pneumothorax.]\n")
    assert load_prompts(path) == {"Pneumothorax": {"positive": ["There is a pneumothorax."],
                                                   "negative": ["No pneumothorax."]}}


@pytest.mark.parametrize("body, needle", [
    ("version: 1\nlabels:\n  Pleural Efusion:\n    positive: [a]\n    negative: [b]\n", "Pleural Efusion"),
    ("version: 1\nlabels:\n  Edema:\n    positive: []\n    negative: [b]\n", "labels.Edema.positive"),
    ("version: 1\nlabels:\n  Edema:\n    positive: [a]\n", "labels.Edema.negative"),
    ("version: 1\nlabels:\n  Edema:\n    positive: [a]\n    negative: [b]\n    neutral: [c]\n", "neutral"),
    ("version: 1\nlabels:\n  Edema:\n    positive: [a, '  ']\n    negative: [b]\n", "labels.Edema.positive[1]"),
    ("version: 1\nlabels:\n  Edema:\n    positive: 'a'\n    negative: [b]\n", "labels.Edema.positive"),
    ("version: 1\nlabels:\n  Edema: [a, b]\n", "labels.Edema"),
    ("version: 2\nlabels:\n  Edema:\n    positive: [a]\n    negative: [b]\n", "version"),
    ("labels:\n  Edema:\n    positive: [a]\n    negative: [b]\n", "version"),
    ("version: 1\nlabels: {}\n", "labels"),
    ("version: 1\nlabel:\n  Edema: {positive: [a], negative: [b]}\n", "label"),
    ("version: 1\nlabels:\n  Edema: {positive: [a], negative: [b]}\n  Edema: {positive: [c], negative: [d]}\n",
     "duplicate key 'Edema'"),
    ("version: 1\nlabels:\n  Edema:\n    positive: [a\n    negative: [b]\n", "malformed YAML"),
    ("- just\n- a list\n", "mapping"),
    ("", "mapping"),
])
def test_prompt_file_errors_name_the_file_and_the_label(tmp_path, body, needle):
    path = _write(tmp_path, body)
    with pytest.raises(PromptError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message and needle in message
    assert isinstance(info.value, ValueError)


def test_missing_prompt_file_is_a_prompt_error(tmp_path):
    with pytest.raises(PromptError, match="nothere.yaml"):
        load_prompts(tmp_path / "nothere.yaml")
