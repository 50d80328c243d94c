"""An exponential moving average of the trained weights (Polyak / EMA averaging) for the shared loop.

The average is what validation scores, what the checkpoint's score ranks and what the model bundle
holds; DeepSpeed's checkpoint keeps the live weights (and this average beside them), so a resumed run
goes on exactly where it stopped. The update is torch's own EMA rule
(``torch.optim.swa_utils.get_ema_multi_avg_fn``), applied to the parameters that train and to the
floating-point buffers (batch-norm statistics), as ``AveragedModel(use_buffers=True)`` does, without
a second copy of the frozen parts. Every rank holds the full weights below ZeRO-3, so every rank keeps
the same average; ZeRO-3 is refused by the config.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

AVERAGE_FILE = "weight_average.pt"  # in the checkpoint folder, written by rank 0


class WeightAverage:
    """The EMA of ``module``'s trained parameters and float buffers, kept in float32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        named = ([(n, p) for n, p in module.named_parameters() if p.requires_grad]
                 + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()])
        self.names = [n for n, _ in named]
        self.live = [t for _, t in named]
        self.average = [t.detach().float().clone() for t in self.live]
        self.updates = 0
        self._update = get_ema_multi_avg_fn(decay)

    def update(self) -> None:
        """Fold the live weights in (after every optimizer step)."""
        self._update(self.average, [t.detach().float() for t in self.live], self.updates)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The module holds the averaged weights inside the block, its live weights again after it."""
        with torch.no_grad():
            saved = [t.detach().clone() for t in self.live]
            for t, a in zip(self.live, self.average):
                t.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(self.live, saved):
                    t.copy_(s)

    def save(self, folder: str) -> None:
        """Write the average (by the module's parameter and buffer names) into a checkpoint folder."""
        torch.save({"decay": self.decay, "updates": self.updates,
                    "average": {n: t.cpu() for n, t in zip(self.names, self.average)}},
                   os.path.join(folder, AVERAGE_FILE))

    def load(self, folder: str) -> None:
        """Restore the average a checkpoint holds; a clear error when it holds none or another shape."""
        path = os.path.join(folder, AVERAGE_FILE)
        if not os.path.exists(path):
            raise RuntimeError("resume: the checkpoint holds no weight average (train.ema_decay was 0 when it "
                               "was written); use a new workdir")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["average"]
        if set(saved) != set(self.names) or any(saved[n].shape != t.shape for n, t in zip(self.names, self.average)):
            raise RuntimeError("resume: the checkpoint's weight average does not fit this model; use a new workdir")
        self.average = [saved[n].to(t.device).float() for n, t in zip(self.names, self.average)]
        self.updates = int(state["updates"])


def maybe_average(module: torch.nn.Module, decay: float):
    """A :class:`WeightAverage` when ``decay`` > 0, else None."""
    return WeightAverage(module, decay) if decay > 0 else None


def applied(average: WeightAverage | None):
    """``average.applied()``, or a no-op without an average."""
    return average.applied() if average is not None else contextlib.nullcontext()
