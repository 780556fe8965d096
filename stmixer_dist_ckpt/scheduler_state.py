"""Moving an LR scheduler to a saved position without taking its saved settings.

``load(adjust_scheduler=True)`` serves runs that change the schedule on resume
(new milestones, a longer run): the scheduler keeps the hyper-parameters it was
built with from the *current* config and only jumps to the saved
``last_epoch``; the learning rates are recomputed there. Upstream did this with
``scheduler.step(epoch)``, which PyTorch deprecates and warns about.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["move_scheduler_to"]


def move_scheduler_to(scheduler: Any, last_epoch: int) -> list[float]:
    """Set ``scheduler`` to ``last_epoch`` and write the LRs for that position into its optimizer.

    Schedulers with a closed form (``MultiStepLR``, ``StepLR``, ...) use it;
    others (AlphAction's ``WarmupMultiStepLR`` computes in closed form in
    ``get_lr``) use ``get_lr()``.

    Returns:
        The learning rates now set, one per param group.
    """
    scheduler.last_epoch = int(last_epoch)
    with warnings.catch_warnings():
        # get_lr() warns when called outside step(); here that is intended.
        warnings.simplefilter("ignore", UserWarning)
        if hasattr(scheduler, "_get_closed_form_lr"):
            lrs = list(scheduler._get_closed_form_lr())
        else:
            lrs = list(scheduler.get_lr())
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = [float(lr) for lr in lrs]
    return [float(lr) for lr in lrs]
