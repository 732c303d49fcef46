"""``mwm pretrain --init``: start the encoder from ImageNet weights or any timm checkpoint instead of random init.

The paper initialises every pretraining from ImageNet weights (MWM §4.2) and SparK recommends it for small data;
continued pretraining on a new dataset starts from an earlier run's ``encoder.pth``.

* ``none``: random init (timm's).
* ``imagenet``: timm's pretrained weights for the arch (needs the Hugging Face hub or its local cache; offline it
  is an error naming the file to download and ``--init PATH``).
* ``PATH``: a timm checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``, optionally wrapped as
  ``{"model": sd}``/``{"state_dict": sd}``) or a run's ``encoder.pth`` / run folder (its ``encoder.json`` must
  name the same arch).

The weights are read and checked by the transfer code (:func:`mwm.transfer.backbone.resolve_weights`,
:func:`~mwm.transfer.backbone.create_backbone`): they must load into ``timm.create_model(arch, **kwargs)`` of the
pretraining encoder with only the classifier missing. The dense model's tensors are then copied into the MIM
encoder's timm model by name — the sparse conversion keeps timm's parameter names and only changes how layers
run, so this equals loading before the conversion. A ViT's ``pos_embed`` is resampled to the pretraining grid by
timm's own checkpoint filter; it is skipped (with a note) when the MAE encoder's position embedding is fixed
rather than learned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MWMError

__all__ = ["InitWeights", "resolve_init", "apply_init", "INIT_HINT"]

INIT_HINT = "`--init none` for random init, or `--init imagenet` for timm's ImageNet weights (online)"


@dataclass
class InitWeights:
    """source: what ``--init`` resolved to; sha256: of the weights file (``imagenet``: of the tensors, in key
    order); state_dict: the dense timm weights without the classifier."""

    source: str
    sha256: str
    state_dict: dict[str, torch.Tensor]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values (independent of how it was stored)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _imagenet(arch: str, kwargs: dict) -> tuple[nn.Module, str]:
    """timm's pretrained model for ``arch`` and where its weights come from; offline → :class:`MWMError`."""
    import timm
    from timm.models import get_pretrained_cfg

    pc = get_pretrained_cfg(arch)
    hub_id = getattr(pc, "hf_hub_id", None) if pc is not None else None
    url = getattr(pc, "url", None) if pc is not None else None
    if not (hub_id or url):
        raise MWMError(f"--init imagenet: timm has no pretrained weights for '{arch}'; pass --init PATH (a checkpoint "
                       f"of a '{arch}') or --init none")
    where = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors" if hub_id else url
    try:
        return timm.create_model(arch, pretrained=True, **kwargs), (f"hf-hub:{hub_id}" if hub_id else url)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise MWMError(f"--init imagenet: cannot get timm's ImageNet weights for '{arch}' ({type(e).__name__}: "
                       f"{first}); this machine looks offline. On a machine "
                       f"with internet download {where} (or run python -c \"import timm; timm.create_model('{arch}', "
                       "pretrained=True)\" there and copy the Hugging Face cache), then pass --init "
                       "/path/to/model.safetensors") from e


def resolve_init(init: str, arch: str, kwargs: dict, expect_sha256: str | None = None) -> InitWeights | None:
    """Read and check the ``--init`` weights for a timm ``arch`` built with ``kwargs`` (the pretraining encoder's:
    ``in_chans``, a ViT's ``img_size`` …). Returns None for ``none``.

    Raises :class:`MWMError` for a missing/unreadable file, another arch (``encoder.json``, or keys and shapes
    that do not fit: only the classifier may be missing), no network for ``imagenet``, and a hash other than
    ``expect_sha256`` (a config.yaml of an earlier run pins its init).
    """
    from ..mim import classifier_keys
    from ..transfer.backbone import create_backbone, resolve_weights

    key = str(init).strip()
    if key.lower() in ("none", "random"):
        return None
    if key.lower() in ("imagenet", "timm"):
        model, source = _imagenet(arch, kwargs)
        sd = model.state_dict()
        sha = tensors_sha256({k: v for k, v in sd.items() if k not in classifier_keys(model)})
        source = f"imagenet ({source})"
    else:
        spec = resolve_weights(key, arch, option="--init", hint=INIT_HINT)
        path = Path(spec.source)
        # the pretraining encoder's kwargs, not the file's: a ViT encoder.pth of a 64 px run initialises a 224 px
        # pretraining (timm's filter resamples pos_embed)
        spec.kwargs = dict(kwargs)
        model = create_backbone(spec)
        sd = model.state_dict()
        sha = file_sha256(path)
        source = str(path)
    if expect_sha256 and sha != expect_sha256:
        raise MWMError(f"--init {key}: the weights' sha256 is {sha[:16]}…, but the config names init_sha256 "
                       f"{expect_sha256[:16]}… (the file changed since that config.yaml was written); pass the "
                       "original weights, or drop init_sha256 to start from these")
    drop = classifier_keys(model)
    return InitWeights(source=source, sha256=sha, state_dict={k: v for k, v in sd.items() if k not in drop})


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
