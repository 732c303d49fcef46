"""ROIs between localization and pretraining: the manifest contract and the sources that need no VLM.

* :mod:`.manifest`: the record type and its rules (read, check, :func:`usable_boxes` / :func:`has_roi`), and
  writing (records, append whole lines, the records already done across shard parts, the merged file);
* :mod:`.boxes`: ROI geometry (masks ↔ boxes, margins, connected components, region overlap metrics);
* :mod:`.gt_rois`: oracle boxes around ground-truth masks, with a fallback manifest, and the manifest + meta
  writer of every non-VLM source; :mod:`.perturb`: degraded oracle boxes (target precision/recall, random place);
  :mod:`.foreground`: classical lung-field / body / brain boxes.

Producers (``mwm.localize``: VLM saliency, reconstruction error) and consumers (``mwm.train``'s ROI join,
``mwm.bench``) both import this package and never each other. Nothing here imports ``localize``, ``masking``,
``mim``, ``train`` or ``transfer``.
"""

from .manifest import ManifestError, check_records, has_roi, read_manifest, usable_boxes

__all__ = ["ManifestError", "check_records", "has_roi", "read_manifest", "usable_boxes"]
