"""``mwm pretrain --init``: start the encoder from ImageNet weights or any timm checkpoint instead of random init.

The paper initialises every pretraining from ImageNet weights (MWM §4.2) and SparK recommends it for small data;
continued pretraining on a new dataset starts from an earlier run's ``encoder.pth``.

* ``none``: random init (timm's).
* ``imagenet``: timm's pretrained weights for the arch (needs the Hugging Face hub or its local cache; offline it
  is an error naming the file to download and ``--init PATH``).
* ``PATH``: a timm checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``, optionally wrapped as
  ``{"model": sd}``/``{"state_dict": sd}``) or a run's ``encoder.pth`` / run folder (its ``encoder.json`` must
  name the same arch).

The weights are read and checked by :func:`mwm.weights.resolve_init` (the loader transfer uses too): they
must load into ``timm.create_model(arch, **kwargs)`` of the pretraining encoder with only the classifier missing.
The dense model's tensors are then copied into the MIM encoder's timm model by name — the sparse conversion keeps timm's parameter names and only changes how layers
run, so this equals loading before the conversion. A ViT's ``pos_embed`` is resampled to the pretraining grid by
timm's own checkpoint filter; it is skipped (with a note) when the MAE encoder's position embedding is fixed
rather than learned.
"""

from __future__ import annotations

from torch import nn

from ..errors import MWMError
from ..weights import InitWeights

__all__ = ["apply_init"]


def _learned(model: nn.Module, name: str) -> bool:
    p = dict(model.named_parameters()).get(name)
    return p is not None and p.requires_grad


def apply_init(mim_model: nn.Module, init: InitWeights) -> dict:
    """Copy ``init``'s weights into a MIM model's encoder (``mim_model.encoder.model``, a timm model); returns the
    record for summary.json: source, sha256, tensors loaded, skipped (with why) and unused keys (layers the
    pretraining pruned, e.g. ConvNeXt's ``head.norm``)."""
    enc = mim_model.encoder
    target = enc.model.state_dict()
    sd = init.state_dict
    load, skipped = {}, []
    for k, v in target.items():
        if k not in sd:
            raise MWMError(f"{init.source}: no '{k}' for the pretraining encoder of '{enc.arch}'")
        if k == "pos_embed" and (not _learned(enc.model, k) or v.shape != sd[k].shape):
            # the MAE encoder's own (fixed 2-D sin-cos) position embedding stays: a learned ImageNet one means
            # something else
            skipped.append(f"{k} (the MAE encoder's position embedding is not a learned one of this shape)")
            continue
        if v.shape != sd[k].shape:
            raise MWMError(f"{init.source}: '{k}' has shape {tuple(sd[k].shape)}, the encoder needs {tuple(v.shape)}")
        load[k] = sd[k]
    missing, unexpected = enc.model.load_state_dict(load, strict=False)
    assert not unexpected and set(missing) <= {s.split(" ")[0] for s in skipped}, (missing, unexpected)
    return {"source": init.source, "sha256": init.sha256, "tensors": len(load), "skipped": skipped,
            "unused": sorted(set(sd) - set(target))}
