"""Contrastive losses: the 2-rank gloo run (local-loss scheme + gradient averaging) equals one process."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medfuse_core.objectives.contrastive import (
    CONTRASTIVE_LOSSES,
    LogitScale,
    gather_features,
    infonce_loss,
    siglip_loss,
)

WORLD = 2
GLOBAL_BATCH = 8
IN_IMG, IN_TXT, DIM = 6, 5, 4
DTYPE = torch.float64  # exact maths: the comparison is about the scheme, not float32 rounding
# text digests of the global batch: rows 0 and 3 share a report on rank 0, rows 1 and 5 across ranks
TEXT_IDS = torch.tensor([10, 11, 12, 10, 13, 11, 14, 15], dtype=torch.int64)
# report readings (findings groups): rows 0, 2 and 6 read alike across ranks, rows 4 and 5 too
GROUP_IDS = torch.tensor([1, 2, 1, 3, 4, 4, 1, 5], dtype=torch.int64)
MODES = ("plain", "dedup", "groups")


def _setup(kind: str):
    """Deterministic linear image/text "encoders", a LogitScale and a global batch (no global RNG)."""
    g = torch.Generator().manual_seed(1234)
    img_proj = nn.Linear(IN_IMG, DIM).to(DTYPE)
    txt_proj = nn.Linear(IN_TXT, DIM).to(DTYPE)
    scale = LogitScale(kind).to(DTYPE)
    with torch.no_grad():
        for p in (*img_proj.parameters(), *txt_proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    x_img = torch.randn(GLOBAL_BATCH, IN_IMG, generator=g, dtype=DTYPE)
    x_txt = torch.randn(GLOBAL_BATCH, IN_TXT, generator=g, dtype=DTYPE)
    modules = nn.ModuleDict({"img": img_proj, "txt": txt_proj, "scale": scale})
    return modules, x_img, x_txt


def _loss_and_grads(kind: str, rows: slice, mode: str = "plain") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    modules, x_img, x_txt = _setup(kind)
    img = F.normalize(modules["img"](x_img[rows]), dim=-1)
    txt = F.normalize(modules["txt"](x_txt[rows]), dim=-1)
    loss = CONTRASTIVE_LOSSES[kind](img, txt, modules["scale"], TEXT_IDS[rows] if mode == "dedup" else None,
                                    GROUP_IDS[rows] if mode == "groups" else None)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in modules.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        local = GLOBAL_BATCH // WORLD
        rows = slice(rank * local, (rank + 1) * local)
        results = {}
        for kind in CONTRASTIVE_LOSSES:
            for mode in MODES:
                loss, grads = _loss_and_grads(kind, rows, mode)
                for grad in grads.values():  # what DDP / DeepSpeed do: average gradients over ranks
                    torch.distributed.all_reduce(grad)
                    grad /= WORLD
                results[(kind, mode)] = {"loss": loss, "grads": grads}
        probe = torch.full((local, 3), float(rank))
        results["gathered"] = gather_features(probe)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("contrastive_ddp")
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, f"worker exit codes {[p.exitcode for p in procs]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(CONTRASTIVE_LOSSES))
def test_two_ranks_match_single_process(kind, mode, distributed_results):
    ref_loss, ref_grads = _loss_and_grads(kind, slice(None), mode)
    losses = torch.stack([r[(kind, mode)]["loss"] for r in distributed_results])
    torch.testing.assert_close(losses.mean(), ref_loss, rtol=1e-9, atol=1e-9)
    # the local losses differ from each other (otherwise the check above would be trivially true)
    assert not torch.allclose(losses[0], losses[1])
    for rank_result in distributed_results:
        grads = rank_result[(kind, mode)]["grads"]
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            assert ref.abs().sum() > 0, name
            assert torch.allclose(grads[name], ref, rtol=1e-7, atol=1e-9), (kind, name, grads[name], ref)


def test_gather_features_concatenates_in_rank_order(distributed_results):
    local = GLOBAL_BATCH // WORLD
    expected = torch.cat([torch.full((local, 3), float(r)) for r in range(WORLD)])
    for r in distributed_results:
        assert torch.equal(r["gathered"], expected)


def test_gather_features_single_process_is_identity():
    x = torch.randn(3, 2)
    assert gather_features(x) is x


def test_infonce_aligned_near_zero_shuffled_larger_and_temperature_learns():
    feats = torch.eye(4, 8)  # orthonormal rows
    big = torch.tensor(100.0)
    assert infonce_loss(feats, feats, big) < 1e-6
    shuffled = feats[torch.tensor([1, 2, 3, 0])]
    assert infonce_loss(feats, shuffled, big) > 10.0

    scale = LogitScale("infonce")
    torch.testing.assert_close(scale(), torch.tensor(1 / 0.07))
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(6, 8, generator=g), dim=-1)
    CONTRASTIVE_LOSSES["infonce"](img, txt, scale).backward()
    assert scale.log_scale.grad is not None and scale.log_scale.grad.abs() > 0


def test_logit_scale_defaults_cap_and_validation():
    sig = LogitScale("siglip")
    torch.testing.assert_close(sig(), torch.tensor(10.0))
    torch.testing.assert_close(sig(with_bias=True)[1].detach(), torch.tensor(-10.0))
    # stored 1-D: DeepSpeed's start-up broadcast views every parameter as bytes (0-dim cannot)
    assert all(p.ndim == 1 for p in sig.parameters())
    assert LogitScale("infonce").bias is None
    capped = LogitScale("infonce", init_temperature=1e-4)
    assert capped().item() == pytest.approx(LogitScale.max_scale)
    with pytest.raises(ValueError):
        LogitScale("infonce", init_bias=0.0)
    with pytest.raises(ValueError):
        LogitScale("triplet")
    with pytest.raises(ValueError):
        CONTRASTIVE_LOSSES["siglip"](torch.eye(2, 3), torch.eye(2, 3), LogitScale("infonce"))


def test_siglip_loss_matches_pairwise_definition():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 3, generator=g, dtype=DTYPE), dim=-1)
    txt = F.normalize(torch.randn(5, 3, generator=g, dtype=DTYPE), dim=-1)
    scale, bias = torch.tensor(7.0, dtype=DTYPE), torch.tensor(-2.0, dtype=DTYPE)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            s = scale * (img[i] @ txt[j]) + bias
            expected -= torch.log(torch.sigmoid(z * s))
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias), expected / 5)


@pytest.mark.parametrize("kind", sorted(CONTRASTIVE_LOSSES))
def test_identical_texts_are_not_each_others_negatives(kind, distributed_results):
    # masking removes negative terms, so the loss drops, on both ranks (the rank-1 row 5 shares its
    # text with rank 0's row 1); SigLIP's -10 bias makes its negatives' terms small, not zero
    for r in distributed_results:
        assert r[(kind, "dedup")]["loss"] < r[(kind, "plain")]["loss"]
    # and equals the plain loss with those logits removed by hand (single process)
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 3, generator=g, dtype=DTYPE), dim=-1)
    txt = F.normalize(torch.randn(4, 3, generator=g, dtype=DTYPE), dim=-1)
    ids = torch.tensor([7, 8, 7, 9])  # rows 0 and 2 share a report
    scale = torch.tensor(5.0, dtype=DTYPE)
    logits = scale * img @ txt.T
    keep = ~((ids[:, None] == ids[None, :]) & ~torch.eye(4, dtype=torch.bool))
    if kind == "infonce":
        def ce(lg):
            return torch.stack([-(lg[i, i] - torch.logsumexp(lg[i][keep[i]], 0)) for i in range(4)]).mean()
        expected = 0.5 * (ce(logits) + ce(logits.T))
        got = infonce_loss(img, txt, scale, ids)
    else:
        bias = torch.tensor(-1.0, dtype=DTYPE)
        z = 2 * torch.eye(4, dtype=DTYPE) - 1
        expected = -(F.logsigmoid(z * (logits + bias)) * keep).sum() / 4
        got = siglip_loss(img, txt, scale, bias, ids)
    torch.testing.assert_close(got, expected)
    # no duplicates: the same as no ids at all
    distinct = torch.arange(4)
    plain = infonce_loss(img, txt, scale) if kind == "infonce" else siglip_loss(img, txt, scale, torch.tensor(-1.0, dtype=DTYPE))
    masked = (infonce_loss(img, txt, scale, distinct) if kind == "infonce"
              else siglip_loss(img, txt, scale, torch.tensor(-1.0, dtype=DTYPE), distinct))
    torch.testing.assert_close(masked, plain)


@pytest.mark.parametrize("kind", sorted(CONTRASTIVE_LOSSES))
def test_same_reading_reports_are_positives(kind):
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(4, 3, generator=g, dtype=DTYPE), dim=-1)
    txt = F.normalize(torch.randn(4, 3, generator=g, dtype=DTYPE), dim=-1)
    groups = torch.tensor([7, 8, 7, 9])  # reports 0 and 2 read alike
    scale, bias = torch.tensor(5.0, dtype=DTYPE), torch.tensor(-1.0, dtype=DTYPE)
    logits = scale * img @ txt.T
    pos = (groups[:, None] == groups[None, :]).to(DTYPE)
    if kind == "infonce":
        def ce(lg):  # each row: the mean negative log-probability of its positives
            logp = lg - torch.logsumexp(lg, 1, keepdim=True)
            return (-(logp * pos).sum(1) / pos.sum(1)).mean()
        expected = 0.5 * (ce(logits) + ce(logits.T))
        got, singletons = infonce_loss(img, txt, scale, group_ids=groups), infonce_loss(img, txt, scale, group_ids=torch.arange(4))
        plain = infonce_loss(img, txt, scale)
    else:
        expected = -F.logsigmoid((2 * pos - 1) * (logits + bias)).sum() / 4
        got, singletons = (siglip_loss(img, txt, scale, bias, group_ids=groups),
                           siglip_loss(img, txt, scale, bias, group_ids=torch.arange(4)))
        plain = siglip_loss(img, txt, scale, bias)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(singletons, plain)  # one pair per group: the plain loss
    assert not torch.allclose(got, plain)


def test_findings_groups_come_from_the_report_reading():
    from medfuse_core.objectives.alignment import findings_id

    assert findings_id("Moderate left pleural effusion. No pneumothorax.") == findings_id("Small right pleural effusion.")
    assert findings_id("No acute cardiopulmonary process.") == findings_id("Lungs are clear. Heart size is normal.")
    assert findings_id("No pleural effusion.") != findings_id("Small pleural effusion.")
    assert findings_id("Possible small effusion.") != findings_id("No effusion.")
