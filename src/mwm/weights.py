"""timm encoder weights, read and checked in one place (a base module: ``mwm.transfer`` builds its backbones
with it, ``mwm pretrain --init`` and ``mwm vlm train --image-init`` start from it).

Where the encoder comes from: ``--weights RUN/encoder.pth`` (or ``RUN/``), ``none`` (random init) or
``timm`` (the arch's ImageNet weights from the hub, for users who are online).

:func:`resolve_weights` turns the option into a :class:`BackboneSpec` (arch, timm kwargs, state dict, input
normalization) *before* anything is built, so a wrong path fails in a second with a message saying what to
pass; :func:`create_backbone` builds the timm model and proves that only classifier keys were left out.
:func:`read_state_dict` reads a weights file (``.pth``/``.pt``/``.bin`` or ``.safetensors``), unwrapping the
``{"model": sd}`` / ``{"state_dict": sd}`` / ``{"module": sd}`` containers that timm, DeiT, MAE and Lightning
checkpoints use, and names a Detectron2 checkpoint as one. :func:`resolve_init` turns an ``--init``
value (``none`` | ``imagenet`` | a file or run folder) into checked weights with their sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import MWMError
from .io import file_sha256

__all__ = ["BackboneSpec", "resolve_weights", "create_backbone", "read_state_dict", "load_timm_weights",
           "detectron2_keys", "classifier_keys", "InitWeights", "resolve_init", "tensors_sha256",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of a timm model's classifier (``fc.*`` for ResNet, ``head.fc.*`` for ConvNeXt, ``head.*``
    for ViT), found from the model's pretrained_cfg so no name is hard-coded."""
    names = model.pretrained_cfg.get("classifier", "fc")
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)}


@dataclass
class BackboneSpec:
    """arch: timm name; kwargs: extra ``timm.create_model`` arguments (e.g. ViT ``img_size``); state_dict: the
    encoder weights or None; hub: load timm's own pretrained weights; mean/std: input normalization (3,);
    source: what ``--weights`` said, for reports; size: pretraining image size when known."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    state_dict: dict | None = None
    hub: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "none"
    size: int | None = None

    def normalizer(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors."""
        return (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=device).view(1, 3, 1, 1))


_WEIGHTS_HINT = ("`--weights none` for random init, or `--weights timm` for the arch's ImageNet weights (needs "
                 "internet)")


def resolve_weights(weights: str | Path, arch: str | None = None, option: str = "--weights",
                    hint: str = _WEIGHTS_HINT) -> BackboneSpec:
    """``weights``: ``none`` | ``timm`` | a file (``encoder.pth`` or a timm checkpoint) | a run folder holding
    ``encoder.pth``.

    With a file, the arch, timm kwargs and normalization come from ``encoder.json`` beside it (written by
    ``mwm pretrain``); ``arch`` must then agree or be None. ``none``/``timm`` need ``arch``. ``option`` and
    ``hint`` name the command-line option and its other values in error messages (``mwm pretrain --init``
    reuses this).
    """
    w = str(weights)
    if w.lower() in ("none", "random", "timm"):
        if not arch:
            raise MWMError(f"{option} {w} needs --arch (a timm model name such as resnet18)")
        return BackboneSpec(arch=arch, hub=w.lower() == "timm", source=w.lower())
    path = Path(w)
    if path.is_dir():
        path = path / "encoder.pth"
    if not path.is_file():
        raise MWMError(f"{option} {weights}: no weights there; pass the encoder.pth (or the run folder) that "
                       f"`mwm pretrain --out RUN` wrote, a timm checkpoint file (.pth / .safetensors), {hint}")
    from .engine.card import EncoderCard

    meta_file = path.with_name("encoder.json")
    card = EncoderCard.beside(path)
    saved_arch = card.arch
    if saved_arch and arch and saved_arch != arch:
        raise MWMError(f"{path} holds a '{saved_arch}' encoder (see {meta_file.name}) but --arch is '{arch}'; "
                       f"pass --arch {saved_arch}, or weights of a '{arch}'")
    arch = arch or saved_arch
    if not arch:
        raise MWMError(f"{path}: no encoder.json beside it to say the architecture; pass --arch")
    sd = read_state_dict(path)
    mean, std = card.input_stats()  # normalize null: pretrained on raw [0, 1] inputs, fed the same way
    return BackboneSpec(arch=arch, kwargs=dict(card.timm_kwargs or {}), state_dict=sd, mean=mean, std=std,
                        source=str(path), size=card.size)


def create_backbone(spec: BackboneSpec, **timm_overrides) -> nn.Module:
    """``timm.create_model(spec.arch, **spec.kwargs, **timm_overrides)`` with the spec's weights loaded.

    ``timm_overrides`` e.g. ``num_classes=3`` (a head) or ``features_only=True, out_indices=…`` (a feature
    pyramid); the state dict's keys are timm's, which ``features_only`` models keep for the trunk. Raises
    :class:`MWMError` when anything but classifier/head keys would be missing or unexpected.
    """
    import timm

    kwargs = {**spec.kwargs, **timm_overrides}
    try:
        model = timm.create_model(spec.arch, pretrained=spec.hub, **kwargs)
    except Exception as e:
        if spec.hub:
            raise MWMError(f"cannot fetch timm's '{spec.arch}' weights ({type(e).__name__}: {e}); offline, pass "
                           "--weights RUN/encoder.pth or --weights none") from e
        raise MWMError(f"timm cannot build '{spec.arch}' with {kwargs}: {e}") from e
    if spec.hub:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        spec.mean, spec.std = tuple(cfg.get("mean", spec.mean)), tuple(cfg.get("std", spec.std))
    if spec.state_dict is not None:
        load_timm_weights(model, spec.state_dict, spec.source, spec.arch, kwargs)
    return model


def load_timm_weights(model: nn.Module, sd: dict, source: str, arch: str, kwargs: dict | None = None) -> list[str]:
    """Load a timm state dict into the timm ``model`` strictly: only the classifier may be missing (with
    ``features_only`` in ``kwargs``: only head keys may be left over). ViTs go through timm's own checkpoint
    filter first (``pos_embed`` resampled to the model's ``img_size``, as timm does for its pretrained weights).

    Returns the missing (classifier) keys; raises :class:`MWMError` naming the missing / unexpected keys or the
    shape mismatch.
    """
    from timm.models.vision_transformer import VisionTransformer

    kwargs = kwargs or {}
    if isinstance(model, VisionTransformer):
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(dict(sd), model)
    # a classifier for another number of classes (a fine-tuned checkpoint) is left out, not a shape error
    own = model.state_dict()
    head = classifier_keys(model)
    sd = {k: v for k, v in sd.items() if not (k in head and k in own and v.shape != own[k].shape)}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensor shape mismatches are raised even with strict=False
        raise MWMError(f"{source} does not fit timm '{arch}' ({kwargs}): "
                       f"{str(e).splitlines()[-1].strip()}; was it saved for a different --arch?") from e
    if kwargs.get("features_only"):
        # features_only models drop the pooling/classifier, so the saved head keys are the unexpected ones
        bad_missing, bad_unexpected = set(missing), {k for k in unexpected if not _is_head(k)}
    else:
        bad_missing, bad_unexpected = set(missing) - classifier_keys(model), set(unexpected)
    if bad_missing or bad_unexpected:
        raise MWMError(f"{source} does not fit timm '{arch}' ({kwargs}): missing "
                       f"{sorted(bad_missing)[:5]}, unexpected {sorted(bad_unexpected)[:5]}; was it saved "
                       "for a different --arch?")
    return list(missing)


# -- reading weight files -------------------------------------------------------------------------------------
_WRAPPERS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())


def detectron2_keys(obj) -> list[str]:
    """What marks ``obj`` as a Detectron2 checkpoint: ``__author__`` / ``matching_heuristics`` at the top, or
    Detectron2's ResNet names (``backbone.bottom_up.…``, ``stem.conv1.…``, ``res2.`` … ``res5.``) in its
    ``model`` dict. Empty when it is none (a timm ``{"model": sd}`` wrapper has ``layer1.…``/``blocks.…``)."""
    if not isinstance(obj, dict):
        return []
    marks = [k for k in ("__author__", "matching_heuristics") if k in obj]
    inner = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    names = [k for k in inner if isinstance(k, str) and (k.startswith(("backbone.bottom_up.", "stem.conv1."))
                                                        or k.split(".")[0] in ("res2", "res3", "res4", "res5"))]
    return marks + names[:2]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The timm state dict in a weights file: ``.safetensors`` or a torch pickle read with ``weights_only=True``
    (tensors and plain containers only: a file that needs arbitrary code to load is refused, with the way out).

    A dict wrapping the weights under ``state_dict`` / ``model`` / ``module`` (timm's train script, DeiT, MAE,
    Lightning) is unwrapped, and a DDP ``module.`` prefix on every key is removed. Raises :class:`MWMError` for
    unreadable files, Detectron2 checkpoints and files with no tensor dict inside.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        extra = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            extra = ("; it holds Python objects besides the weights (e.g. training args): if you trust it, save the "
                     "weights alone: torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')")
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MWMError(f"{path}: cannot read the weights ({type(e).__name__}: {first}){extra}") from e
    d2 = detectron2_keys(obj)
    if d2:
        raise MWMError(f"{path} is a Detectron2 checkpoint (it has {', '.join(repr(k) for k in d2)}); pass the timm "
                       "state dict instead (mwm pretrain writes it as encoder.pth beside encoder_d2.pth)")
    sd = obj
    if isinstance(sd, dict) and not _is_state_dict(sd):
        sd = next((sd[k] for k in _WRAPPERS if _is_state_dict(sd.get(k))), None)
        if sd is None:
            raise MWMError(f"{path}: no state dict inside (top-level keys {sorted(map(str, obj))[:6]}); pass a timm "
                           "state dict, or a checkpoint holding one under 'model' or 'state_dict'")
    if not _is_state_dict(sd):
        raise MWMError(f"{path}: not a state dict of tensors ({type(obj).__name__}); pass a timm checkpoint file")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from a DDP wrapper
    return sd


def _is_head(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "norm", "fc_norm", "head_drop", "global_pool")


# -- --init: the weights a model starts from ------------------------------------------------------------------
INIT_HINT = "`--init none` for random init, or `--init imagenet` for timm's ImageNet weights (online)"


@dataclass
class InitWeights:
    """source: what ``--init`` resolved to; sha256: of the weights file (``imagenet``: of the tensors, in key
    order); state_dict: the dense timm weights without the classifier."""

    source: str
    sha256: str
    state_dict: dict[str, torch.Tensor]


def tensors_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values (independent of how it was stored)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
