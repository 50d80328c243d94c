"""Image <-> report retrieval recall (R@K) for stage-1 contrastive pretraining, pure NumPy.

Row ``i`` of the image embeddings and row ``i`` of the text embeddings belong to the same study
(the image and its own report). Similarity is cosine; both sides are L2-normalised here.

Duplicate reports. Real archives (and the synthetic corpus) repeat reports verbatim ("No acute
cardiopulmonary process."), so retrieving *another* study's identical report is not an error.
Pass ``text_keys`` (one key per row, e.g. the normalised report text) and every candidate whose
key equals the key of the query's own partner counts as a hit:

* image -> text: any text whose key equals the key of the image's own report;
* text -> image: any image whose own report has the same key as the query text.

Ties are broken pessimistically and deterministically: a query's rank is the number of
*non-matching* candidates whose similarity is greater than or equal to that of its best matching
candidate (a tie with a correct item never counts in its favour). It is a hit at K when that
rank is below K. Similarities within ``TIE_ATOL`` of each other (float64 arithmetic) count as
tied, so a result does not depend on the BLAS summation order, the chunk size, or the row order.

Memory: similarities are computed one block of queries at a time, ``O(chunk_size x N)``, never
the full ``N x N`` matrix (test splits are 10^4-10^5 studies).

Keys are report text: they are only compared, never returned, logged, or put into messages.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["recall_at_k", "TIE_ATOL", "DEFAULT_BLOCK_ELEMENTS"]

#: Cosine similarities closer than this are treated as tied (and the tie goes against the query).
TIE_ATOL = 1e-9
#: With ``chunk_size=None`` a block of queries holds at most about this many similarities.
DEFAULT_BLOCK_ELEMENTS = 1 << 23


def _normalised(emb: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got {x.ndim} dimension(s)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} has {zero.size} all-zero row(s) (first: row {int(zero[0])}); "
                         "cosine similarity is undefined")
    return x / norms


def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")
        out.append(int(k))
    if not out:
        raise ValueError("ks must name at least one K")
    return tuple(dict.fromkeys(out))


def _key_codes(text_keys: Sequence[str] | None, n: int) -> np.ndarray | None:
    if text_keys is None:
        return None
    keys = list(text_keys)
    if len(keys) != n:
        raise ValueError(f"text_keys has {len(keys)} entries but there are {n} embedding rows")
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise ValueError(f"text_keys[{i}] is a {type(key).__name__}, expected str")
    # Integer codes: equal keys <=> equal codes. The key strings are not kept past this point.
    _, codes = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


def _ranks(queries: np.ndarray, candidates: np.ndarray, codes: np.ndarray | None, chunk: int) -> np.ndarray:
    """Pessimistic 0-based rank of the best matching candidate for every query row."""
    n = queries.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    cand_t = np.ascontiguousarray(candidates.T)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sims = queries[start:stop] @ cand_t  # [chunk, N]
        if codes is None:
            # the only match is the partner (column start + r); it always clears its own bar
            best = sims[np.arange(stop - start), np.arange(start, stop)]
            ranks[start:stop] = np.count_nonzero(sims >= (best - TIE_ATOL)[:, None], axis=1) - 1
        else:
            match = codes[start:stop, None] == codes[None, :]
            best = np.where(match, sims, -np.inf).max(axis=1)
            beaten = (sims >= (best - TIE_ATOL)[:, None]) & ~match
            ranks[start:stop] = np.count_nonzero(beaten, axis=1)
    return ranks


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                text_keys: Sequence[str] | None = None, *, chunk_size: int | None = None) -> dict:
    """Recall@K of image->text and text->image retrieval over paired embeddings.

    Args:
        image_emb: ``[N, D]`` image embeddings; row ``i`` pairs with ``text_emb[i]``. Any scale:
            rows are L2-normalised here (all-zero or non-finite rows are an error).
        text_emb: ``[N, D]`` report embeddings.
        ks: the cut-offs K (positive integers; K >= N gives 1.0).
        text_keys: optional, one key per row (e.g. the normalised report text). When given, a
            retrieved item whose key equals the key of the query's own partner is also a hit:
            image->text, any text with the same key as the image's own report; text->image, any
            image whose own report has the same key as the query text. Keys are only compared,
            never returned or logged.
        chunk_size: queries per similarity block (memory ``O(chunk_size x N)``); ``None`` picks
            a block of about ``DEFAULT_BLOCK_ELEMENTS`` similarities. The result does not
            depend on it.

    Ties are pessimistic: a query's rank is the number of non-matching candidates with
    similarity >= its best matching candidate's (within ``TIE_ATOL``); a hit at K is rank < K.

    Returns:
        ``{"image_to_text": {"R@1": .., ...}, "text_to_image": {...}, "n": N}``.
    """
    images = _normalised(image_emb, "image_emb")
    texts = _normalised(text_emb, "text_emb")
    if images.shape != texts.shape:
        raise ValueError(f"image_emb {images.shape} and text_emb {texts.shape} must have the same shape [N, D]")
    n = images.shape[0]
    if n == 0:
        raise ValueError("recall_at_k needs at least one pair")
    ks = _checked_ks(ks)
    codes = _key_codes(text_keys, n)
    if chunk_size is None:
        chunk = max(1, min(n, DEFAULT_BLOCK_ELEMENTS // n))
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        chunk = int(chunk_size)

    out: dict = {}
    for direction, queries, candidates in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ranks = _ranks(queries, candidates, codes, chunk)
        out[direction] = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
    out["n"] = int(n)
    return out
