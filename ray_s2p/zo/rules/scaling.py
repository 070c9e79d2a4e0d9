"""How a step's move grows with Q, the number of directions it evaluates.

Every rule forms one coefficient per direction and averages them over the valid
directions (base.py, q-averaging). The average of Q directions is a less noisy
estimate, but on its own it moves no farther than one direction does, so more
replicas in direction mode would only remove noise and never shorten a run. With
n averaged directions the largest stable step grows about linearly in n while n
is below the loss's effective rank (Malladi et al. 2023, MeZO, Lemma 2 and Eq. 3;
their Table 6 scales the learning rate with n). A ``StepScaling`` multiplies
the averaged move by

    s(Q) = Q / Q_t          (linear)
    s(Q) = sqrt(Q / Q_t)    (sqrt)
    s(Q) = 1                (none: the plain q-average)

where Q_t (``optimizer.tuned_directions``) is the Q at which lr / eta are meant
as written, so s(Q_t) = 1 exactly and a config keeps its meaning at the Q it was
tuned at. Q is the number of directions in the step's loss table, so a step of a
resumed run with another replica count is scaled for the Q it actually evaluated.
How s enters each rule's formula is in docs/method.md ("Step size and the number
of directions"). Pure stdlib, like the rest of zo/rules/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALING_KINDS = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class StepScaling:
    """The factor s(Q) by which a step of Q directions scales the averaged move.

    Attributes:
        kind: "linear", "sqrt" or "none".
        tuned_directions: Q_t, the directions per step at which s = 1.
    """

    kind: str = "none"
    tuned_directions: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCALING_KINDS:
            raise ValueError(f"optimizer.step_scaling: unknown value {self.kind!r}. Fix: use linear, sqrt or none")
        if self.tuned_directions < 1:
            raise ValueError(f"optimizer.tuned_directions: got {self.tuned_directions}. Fix: use 1 or more")

    def factor(self, directions: int) -> float:
        """s(Q) for a step of ``directions`` = Q directions (1.0 exactly when Q = Q_t or kind is none).

        Raises:
            ValueError: Q < 1.
        """
        if directions < 1:
            raise ValueError(f"a step needs at least one direction, got {directions}")
        if self.kind == "none" or directions == self.tuned_directions:
            return 1.0
        ratio = directions / self.tuned_directions
        return ratio if self.kind == "linear" else math.sqrt(ratio)


NO_SCALING = StepScaling("none", 1)
