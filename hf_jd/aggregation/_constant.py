"""Constant: a fixed, user-given linear combination of the rows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, vector_str
from ._preference import as_vector
from ._spec import aggregator_spec
from ._weighting_bases import Weighting


def _check_weights(owner: str, name: str, value: Tensor | Sequence[float]) -> Tensor:
    vector = as_vector(owner, name, value, allow_empty=True)
    if vector.numel() > 0 and not bool((vector != 0).any()):
        raise ValueError(f"{owner}'s {name} are all zeros, which gives a zero update at every step.")
    return vector


class ConstantWeighting(Weighting):
    r"""Returns the fixed weights :math:`w` given at construction, whatever the Gramian.

    Reads only the number of rows: it takes a Jacobian as well as a Gramian. Assigning ``weights``
    checks them again; an empty vector is accepted (as in TorchJD) but fits only an empty Jacobian.

    Args:
        weights: One weight per objective, as a 1-D tensor or a list (e.g. parsed from JSON). A float
            tensor is kept as it is (not copied).
    """

    weights = Checked("Constant", _check_weights)

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        self.weights = weights  # type: ignore[assignment]

    @property
    def accepts_matrix(self) -> bool:
        return True

    @property
    def required_rows(self) -> int | None:
        return self.weights.numel()

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        if self.weights.numel() != m:
            raise ValueError(
                f"Constant has {self.weights.numel()} weights but there are {m} objectives (losses). "
                "Give exactly one weight per loss."
            )
        return self.weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"ConstantWeighting(weights={self.weights.tolist()})"


@aggregator_spec(
    name="constant",
    summary="fixed, user-given weights",
    example_kwargs=lambda m: {"weights": [float(i + 1) for i in range(m)]},
)
class Constant(GramianWeightedAggregator):
    r"""Fixed linear combination of the rows: :math:`A(J) = J^\top w` for a constant :math:`w`.

    Useful for hand-tuned static task weights in multi-task learning. Arguments as in
    :class:`ConstantWeighting` (``gramian_weighting.weights``; ``weights()`` is the method of every
    weighted aggregator).
    """

    gramian_weighting: ConstantWeighting

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__(ConstantWeighting(weights))

    def __repr__(self) -> str:
        return f"Constant(weights={self.gramian_weighting.weights.tolist()})"

    def __str__(self) -> str:
        return f"Constant({vector_str(self.gramian_weighting.weights)})"
