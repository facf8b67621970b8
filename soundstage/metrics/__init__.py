"""Named evaluation protocols for audio-visual segmentation, equal to the reference code.

``evaluate(protocol, pred, gt, **options) -> dict`` scores a whole set at once;
``Accumulator(protocol, **options)`` does the same batch by batch (``update``, ``compute``;
``state_dict`` / ``load_state_dict`` for summing over DDP ranks). ``PROTOCOLS`` maps each name to
its ``Protocol`` (``doc``: the rules and the upstream file they come from; ``defaults``: options).
"""

from soundstage.metrics.inputs import MetricInputError  # noqa: F401
from soundstage.metrics.protocols import PROTOCOLS, Accumulator, Protocol, evaluate  # noqa: F401
