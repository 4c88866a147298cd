"""Record FFN activation statistics of a diffusion denoiser with scoped hooks, indexed by sampler step.

* :mod:`.clock`: :class:`SamplerClock`, which assigns each denoiser call to a sampler step and a
  classifier-free-guidance half (wrapping ``scheduler.step`` while it runs) and stops the pipeline after the last
  counted step.
* :mod:`.recorder`: :class:`ActivationRecorder`, the context manager that streams per-neuron statistics of the FFN
  layers through forward pre-hooks, reading the clock.
* :mod:`.record`: :func:`record`, which runs a pipeline over prompts (or prompt embeddings) in batches with a
  recorder and returns the statistics.
"""

from __future__ import annotations

from .clock import SamplerClock
from .recorder import ActivationRecorder
from .record import record

__all__ = ["ActivationRecorder", "record", "SamplerClock"]
