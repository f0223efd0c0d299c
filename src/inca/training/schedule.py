"""Learning-rate schedules, shared by the adapter bank and the fine-tuning baselines."""

from __future__ import annotations

import math


class cosine_with_warmup:  # noqa: N801 - used as a function: LambdaLR(opt, cosine_with_warmup(...))
    """Multiplier for LambdaLR: linear warm-up, then cosine decay to zero at
    ``total_steps`` (which a time budget may shorten once the first epoch is timed).

    Example:
        >>> f = cosine_with_warmup(total_steps=10, warmup_steps=2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
