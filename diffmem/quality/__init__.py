"""Image quality after an edit: Fréchet distance, KID and CLIP score, on named features.

Everything here is a pure function of images or features, meant for the small sets a mitigation report has
(tens of images of 32-64 px):

* :func:`frechet_distance` and :func:`kernel_inception_distance` compare two sets of features;
* :func:`image_features` embeds images with a named feature extractor (:func:`get_feature_extractor`): a local
  Inception-v3 weights file, SSCD (the packaged ONNX model by default) or CLIP image features;
* :func:`clip_score` measures how well images follow their prompts (torchmetrics' convention);
* :func:`quality_report` puts them together for a before / after comparison, and :func:`memorized_becomes`
  measures what memorized prompts render after an edit, against the model's ordinary generations.

A distance is named after its features: ``FID`` and ``KID`` on Inception features only, ``FD_sscd`` or
``KID_clip-random`` otherwise, because a Fréchet distance on other features is not FID and is not on FID's scale.

The modules: :mod:`.features` (the extractors and their registry), :mod:`.distances` (FD, KID), :mod:`.clip`
(CLIP score) and :mod:`.reports` (:func:`quality_report`, :func:`memorized_becomes`).
"""

from . import clip, distances, features, reports
from .clip import *  # noqa: F403  (each module's __all__ is the package's)
from .distances import *  # noqa: F403
from .features import *  # noqa: F403
from .reports import memorized_becomes, quality_report

__all__ = [*features.__all__, *distances.__all__, *clip.__all__, "quality_report", "memorized_becomes"]
