"""Mitigation that survives re-extraction: locate an edit, tune its strength, and harden it against the attack.

:func:`mitigate` uses only the ``locate`` rows (memorized prompts with their training images) and the ``nonmem``
rows (ordinary prompts) of a manifest; ``heldout`` rows are never read, so a final evaluation on them is honest.

1. Record FFN statistics of the ``locate`` prompts and of base prompts; locate an edit (``wanda``, ``neuron`` or
   ``directions``).
2. ``ratio=None`` (auto): try strengths in ascending order and keep the smallest whose replication (out of fold,
   with ``folds``) is at most ``target`` while the non-memorized drift stays within the seed-to-seed spread and the
   memorized prompts still render image-like.
3. ``robust="prune"`` (diffmem's robust mitigation): attack the ``locate`` rows on the edited model by optimising
   their conditioning (:func:`~diffmem.reextraction.reextract`) from every start, zero the weights that carry the
   memorized images under those conditionings (loss saliency, or FFN statistics recorded under them) and merge them
   into the edit; repeat until the attack's rate is at most ``target`` at every sampler or ``max_rounds`` is reached.
4. ``robust="finetune"`` (Finding DoRI's adversarial fine-tuning, the published anchor): fine-tune the denoiser
   with the ordinary denoising loss on non-memorized data plus a loss that maps the adversarial conditionings to
   the edited model's own prediction for the original prompt; the result is a :class:`~diffmem.edits.WeightDelta`.
5. ``folds`` (cross-fitting): the strength and robust rounds are repeated without each fold of the ``locate`` rows
   and the left-out rows measured: the estimate of what the edit does on memorized images not given.

Modules: :mod:`.config` (settings and result), :mod:`.rows` (rows loaded once), :mod:`.strength` (the sweep),
:mod:`.robust` (the robust rounds), :mod:`.finetune` (adversarial fine-tuning), :mod:`.locality` (are triggers
local?) and :mod:`.fit` (:func:`mitigate` and the cross-fitting).
"""

from .config import DEFAULT_RANKS, DEFAULT_RATIOS, ROBUST, MitigateConfig, MitigationResult
from .finetune import finetune_against
from .fit import mitigate
from .locality import locality_evidence
from .rows import Rows, load_rows

__all__ = [
    "MitigateConfig",
    "MitigationResult",
    "mitigate",
    "finetune_against",
    "locality_evidence",
    "Rows",
    "load_rows",
    "DEFAULT_RATIOS",
    "DEFAULT_RANKS",
    "ROBUST",
]
