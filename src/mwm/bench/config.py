"""``BenchConfig``: one dataset, one ROI source, pretraining arms, seeds and transfer tasks (YAML).

Example (configs/bench/br35h_r18_64.yaml)::

    name: br35h-r18-64
    data: ../shared/data/br35h.npz
    arch: resnet18
    size: 64
    seeds: [0, 1, 2]
    rois: {source: gt-boxes, expand: 0.1}   # or {source: foreground, kind: lungs}
    pretrain: {epochs: 10, batch_size: 64}
    arms:
      - {name: scratch, pretrain: false}
      - {name: random-0.6, masking: {strategy: random, ratio: 0.6}}
      - {name: mae-0.75, method: mae, model: {arch: vit_tiny_patch16_224}, masking: {strategy: random, ratio: 0.75}}
      - {name: mwm-0.8-0.2, masking: {strategy: roi, ratio_in: 0.8, ratio_out: 0.2}}
      - {name: mwm-degraded, masking: {strategy: roi, ratio_in: 0.8, ratio_out: 0.2},
         rois: {source: gt-boxes, perturb: {precision: 0.3, recall: 0.9}, seed: 0}}
    baseline: random-0.6
    tasks:
      - {kind: linear}
      - {kind: full, options: {epochs: 10}}

Every arm × seed pretrains (unless ``pretrain: false``: the no-pretraining arm, random init) with the shared
``pretrain`` options + the arm's, then runs every task on the exported encoder with that seed.

An arm names its pretraining ``method`` (a name of :mod:`mwm.train.methods`' registry: spark, the default, mae,
…; checked when the file loads) and that method's own options in ``model`` (over the bench's ``arch`` / ``size`` /
``pretrain.model``). The shared ``pretrain.model`` keys reach an arm only when its method has them (``mask_stride``
means nothing to a contrastive method); a key no registered method has is an error. An arm without ``method`` is
exactly the SparK arm it was before methods could be named: its pretraining identity is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..importance.meijering import DEFAULT_SIGMAS
from ..rois.perturb import PerturbConfig

__all__ = ["BenchConfig", "ArmConfig", "ChoiceConfig", "RoiSourceConfig", "TaskConfig", "TASK_KINDS", "run_dir",
           "method_masks"]

TASK_KINDS = ("linear", "full", "segment", "detect")


# ROI sources whose manifest carries per-image maps (saliency strategies, map targets), not only boxes.
MAP_SOURCES = ("manifest", "meijering")


class RoiSourceConfig(BaseModel):
    """Where guided arms get their ROIs: ``gt-boxes`` (expanded boxes around the ground-truth masks — an oracle
    upper bound; with ``perturb`` degraded to a target occlusion precision/recall or moved to random places),
    ``foreground`` (classical lung-field / body / brain boxes, ``kind``; no masks or prompts needed),
    ``reconstruction-error`` (where the pretraining run ``run`` reconstructs worst; no masks or prompts),
    ``generic-prompt`` (``mwm localize`` with the VLM ``vlm`` and a target-agnostic ``prompt``), ``meijering`` (M&M
    ridge maps, ``mwm importance meijering`` at the bench's size: importance maps for the saliency strategies and
    the ridge target), ``manifest`` (a ``rois.jsonl`` from ``mwm localize`` at ``path``) or ``none``."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["none", "gt-boxes", "foreground", "reconstruction-error", "generic-prompt", "meijering",
                    "manifest"] = "none"
    path: Path | None = None
    expand: float = Field(default=0.1, ge=0, description="gt-boxes / foreground / reconstruction-error: margin as a "
                          "fraction of the box size")
    box_mode: Literal["union", "per_component"] = "union"
    fallback: Path | None = Field(default=None, description="gt-boxes / foreground / reconstruction-error: a "
                                  "rois.jsonl from `mwm localize` whose ROIs serve the images without a box")
    perturb: PerturbConfig | None = Field(default=None, description="gt-boxes: degrade the boxes, e.g. {precision: "
                                          "0.3, recall: 0.9} or {place: random}")
    seed: int = Field(default=0, ge=0, description="perturb / reconstruction-error: seed of the draws (with each "
                      "image id)")
    kind: Literal["lungs", "body", "brain"] = Field(default="lungs", description="foreground: lung fields, the "
                                                    "body/head, or the brain inside the skull")
    # reconstruction-error
    run: Path | None = Field(default=None, description="reconstruction-error: a `mwm pretrain` run folder (its "
                             "checkpoints/last.pt; part of the identity by content hash)")
    masks: int = Field(default=8, ge=1, description="reconstruction-error: random masks per image")
    ratio: float = Field(default=0.6, gt=0, lt=1, description="reconstruction-error: mask ratio of each mask")
    level: Literal["patch", "pixel"] = "patch"
    binarize: Literal["otsu", "kmeans", "quantile"] = "quantile"
    quantile: float = Field(default=0.9, gt=0, lt=1, description="reconstruction-error with binarize quantile: "
                            "keep the hardest 1 − quantile of each image's pixels")
    components: int = Field(default=1, ge=1, description="reconstruction-error: the k largest high-error regions")
    # generic-prompt
    vlm: str | None = Field(default=None, description="generic-prompt: the VLM (a `mwm vlm` folder or hub name)")
    prompt: str = Field(default="an abnormality", min_length=1, description="generic-prompt: the target-agnostic "
                        "prompt")
    split: str | None = Field(default=None, description="generic-prompt / reconstruction-error / meijering: only "
                              "this split (e.g. train, what pretraining reads); default every image (meijering: "
                              "pretraining's default split)")
    # meijering
    sigmas: list[float] = Field(default_factory=lambda: list(DEFAULT_SIGMAS), min_length=1, description="meijering: "
                                "the filter's scales in pixels of the bench's size")
    black_ridges: bool = Field(default=False, description="meijering: dark ridges (default bright ones)")
    options: dict[str, Any] = Field(default_factory=dict, description="generic-prompt: more `mwm localize` "
                                    "settings (LocalizeConfig keys, e.g. {m2ib: {layer: 4}, binarize: threshold})")

    @model_validator(mode="after")
    def _path(self) -> "RoiSourceConfig":
        if self.source == "manifest" and self.path is None:
            raise ValueError("rois.source 'manifest' needs rois.path (the rois.jsonl `mwm localize` wrote)")
        if self.source == "reconstruction-error" and self.run is None:
            raise ValueError("rois.source 'reconstruction-error' needs rois.run (a `mwm pretrain` run folder, e.g. a "
                             "few epochs of random masking on the same data)")
        if self.source == "generic-prompt" and self.vlm is None:
            raise ValueError("rois.source 'generic-prompt' needs rois.vlm (a `mwm vlm train`/`export` folder or a "
                             "hub name)")
        if self.fallback is not None and self.source not in ("gt-boxes", "foreground", "reconstruction-error"):
            raise ValueError("rois.fallback fills images without a box and needs rois.source 'gt-boxes', "
                             "'foreground' or 'reconstruction-error'")
        if self.perturb is not None and self.source != "gt-boxes":
            raise ValueError("rois.perturb degrades ground-truth boxes and needs rois.source 'gt-boxes'")
        if self.perturb is not None and self.perturb.has_targets and self.box_mode != "union":
            raise ValueError("rois.perturb with precision/recall makes one box per image; use box_mode 'union'")
        if self.source != "meijering" and (self.sigmas != list(DEFAULT_SIGMAS) or self.black_ridges):
            raise ValueError("rois.sigmas / black_ridges set the Meijering filter and need rois.source 'meijering'")
        if self.options and self.source != "generic-prompt":
            raise ValueError("rois.options are `mwm localize` settings and need rois.source 'generic-prompt'")
        if self.source == "generic-prompt":
            self.localize_config(Path("."), Path("."))  # unknown or invalid localize keys fail with the bench file
        return self

    def localize_config(self, data: Path, out: Path):
        """generic-prompt: the ``LocalizeConfig`` this source runs (``options`` over the source's own keys)."""
        from pydantic import ValidationError

        from ..localize.pipeline import LocalizeConfig

        own = {"data", "out", "vlm", "prompt", "split"}
        clash = sorted(own & set(self.options))
        if clash:
            raise ValueError(f"rois.options must not set {clash}: give them as rois.vlm / rois.prompt / rois.split "
                             "(data and out are the bench's)")
        try:
            return LocalizeConfig.model_validate({**self.options, "data": data, "out": out, "vlm": self.vlm,
                                                  "prompt": self.prompt, "split": self.split})
        except ValidationError as e:
            bad = "; ".join(f"options.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(f"rois (generic-prompt): {bad}") from None


def _check_seeds(v: list[int]) -> list[int]:
    if len(set(v)) != len(v):
        raise ValueError(f"seeds must be unique (each seed is one run of an arm); got {v}")
    return v


def method_masks(name: str) -> bool:
    """Whether the registered pretraining method ``name`` draws keep-masks with a masking strategy (its arms have a
    ``masking`` and a strategy column): the MIM methods (:class:`~mwm.train.methods.MaskedImageModeling`
    subclasses), or a class that says so with ``draws_masks = True``; contrastive methods do not."""
    from ..train.methods import MaskedImageModeling, method_spec

    factory = method_spec(name).factory
    flag = getattr(factory, "draws_masks", None)
    if flag is not None:
        return bool(flag)
    return isinstance(factory, type) and issubclass(factory, MaskedImageModeling)


class ArmConfig(BaseModel):
    """One pretraining arm: a name, its pretraining ``method`` (default: the bench's ``pretrain.model.method``,
    else spark) with the method's own ``model`` options, the masking (``mwm.masking.MaskingConfig`` fields) and any
    other ``PretrainConfig`` overrides; ``pretrain: false`` makes the no-pretraining (random init) arm. ``rois``
    overrides the bench's ROI source for this arm (e.g. gt-boxes for one arm, a localize manifest for another)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    pretrain: bool = True
    method: str | None = Field(default=None, description="the pretraining method (a registered name: spark, mae, "
                               "…); default the bench's pretrain.model.method, else spark")
    model: dict[str, Any] = Field(default_factory=dict, description="the method's own options (its config "
                                  "class's fields, e.g. {arch: vit_tiny_patch16_224, decoder_depth: 2}), over "
                                  "the bench's arch / size / pretrain.model")
    masking: dict[str, Any] = Field(default_factory=dict)
    rois: RoiSourceConfig | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="more PretrainConfig overrides")
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1,
        description="this arm's seeds (default: the bench's), e.g. 5 seeds for the main arms and 3 for a sweep")
    phase: int = Field(default=0, ge=0, description="run order: every seed of the phase-0 arms first, then phase "
                       "1, …; the bench's baseline_seeds run as soon as the baseline_from arms are done")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else _check_seeds(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is not None:
            from ..train.methods import method_spec

            method_spec(v)  # ValueError: "unknown pretraining method 'x'; choose one of [...]" (the registry's)
        return v

    @model_validator(mode="after")
    def _method_fields(self) -> "ArmConfig":
        if not self.pretrain and (self.method is not None or self.model):
            raise ValueError(f"arm '{self.name}' does not pretrain (pretrain: false); remove its method / model")
        if "method" in self.model:
            raise ValueError(f"arm '{self.name}': give the method as the arm's `method:`, not model.method")
        if self.method is not None and self.masking and not method_masks(self.method):
            raise ValueError(f"arm '{self.name}': method '{self.method}' draws no masks; remove its masking")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # method / model / phase at their defaults are left out, so the config.yaml of a bench made before arms
        # had them dumps as it did (shards of one bench compare their dumps)
        d = handler(self)
        if self.method is None:
            d.pop("method", None)
        if not self.model:
            d.pop("model", None)
        if self.phase == 0:
            d.pop("phase", None)
        return d

    @property
    def strategy(self) -> str | None:
        """The masking strategy (None: no pretraining, or a method that draws no masks)."""
        if not self.pretrain or (self.method is not None and not method_masks(self.method)):
            return None
        return self.masking.get("strategy", "random")


# In a task's ``arms``: the arm ``baseline_from`` chooses (or the fixed baseline).
BASELINE_ALIAS = "baseline"


class ChoiceConfig(BaseModel):
    """A setting chosen on val: of the arms ``among`` (e.g. one method at three learning rates), the one with the
    best mean *validation* score (the first task's first metric, over each candidate's own seeds) is chosen once
    every candidate has finished them; it then also runs ``seeds``. In a task's ``arms``, ``name`` stands for the
    chosen arm. ``baseline_from`` / ``baseline_seeds`` are the choice named ``baseline``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the choice's name: a task's arms may use it for the chosen arm")
    among: list[str] = Field(min_length=2, description="the candidate arms")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="more seeds for the chosen "
                                                     "arm, e.g. the main arms' seeds it lacks")

    @field_validator("among", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"entries must be unique: {v}")
        return v


class TaskConfig(BaseModel):
    """A transfer task: ``linear`` / ``full`` (``mwm finetune``), ``segment``, ``detect``; ``options`` are fields
    of that command's config (e.g. ``{epochs: 10, lr: 1e-3}``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["linear", "full", "segment", "detect"]
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    arms: list[str] | None = Field(default=None, description="run this task on these arms only (default: all), "
                                   "e.g. an expensive detection task on the main arms of a sweep; 'baseline' "
                                   "(or a choose: entry's name) stands for the arm chosen on val, once its "
                                   "candidates are done")
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, description="run this task on these "
                                                            "seeds only (default: every seed of its arms), e.g. "
                                                            "3 seeds of an expensive full fine-tuning")

    def runs_on(self, arm: str, seed: int | None = None, chosen: dict[str, str] | None = None) -> bool:
        """Whether this task runs on ``arm`` × ``seed`` (any seed when None); ``chosen`` maps each choice made so
        far ('baseline', a choose: name) to its arm (an arm listed only through a choice not yet made does not
        run the task)."""
        listed = self.arms is None or arm in self.arms or any(chosen.get(a) == arm for a in self.arms if chosen)
        return listed and (seed is None or self.seeds is None or seed in self.seeds)

    @property
    def label(self) -> str:
        return self.name or self.kind


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "bench"
    data: Path
    out: Path | None = Field(default=None, description="default: runs/bench/<name>")
    archive: Path | None = Field(default=None, description="a folder (e.g. under version control) that keeps "
                                 "every finished part's identity and numbers; an arm x seed archived whole is "
                                 "tabulated from it and not run again, even in an empty OUT")
    arch: str = "resnet18"
    size: int = Field(default=64, ge=16)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rois: RoiSourceConfig = RoiSourceConfig()
    pretrain: dict[str, Any] = Field(default_factory=dict, description="PretrainConfig overrides for every arm")
    pretrain_images: int | None = Field(default=None, ge=1, description="pretraining length as images seen: every "
                                        "arm's epochs = max(1, round(pretrain_images / N)), N the images it "
                                        "pretrains on (the train split after limit), in place of pretrain.epochs; "
                                        "a budget that carries over to datasets of other sizes (the evidence "
                                        "protocol: 25,600 = 12 epochs of Br35H's 2,129 train images)")
    arms: list[ArmConfig] = Field(min_length=1)
    baseline: str | None = Field(default=None, description="arm the others are compared to; default: the first "
                                                           "arm with random masking")
    baseline_from: list[str] | None = Field(default=None, min_length=1, description="choose the baseline among "
                                            "these arms: the best mean *validation* score (first task, first "
                                            "metric), e.g. random masking at its best ratio, as the MWM paper "
                                            "compares to SparK at its best ratio")
    baseline_seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="more seeds for "
                                                           "the arm baseline_from chooses, run once every "
                                                           "baseline_from arm has finished its own seeds (the choice "
                                                           "uses those seeds only), e.g. [3, 4]: the best random "
                                                           "ratio gets the main arms' five seeds")
    choose: list[ChoiceConfig] = Field(default_factory=list, description="settings chosen on val like the "
                                       "baseline, e.g. a contrastive method's learning rate: {name: simclr, "
                                       "among: [simclr-lr1e-3, simclr-lr4e-3], seeds: [1, 2, 3, 4]}")
    tasks: list[TaskConfig] = Field(default_factory=lambda: [TaskConfig(kind="linear")], min_length=1)
    device: str = Field(default="auto", description="auto, cpu, cuda")

    @field_validator("arms")
    @classmethod
    def _unique(cls, v: list[ArmConfig]) -> list[ArmConfig]:
        names = [a.name for a in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {sorted(dup)}")
        return v

    @field_validator("seeds", "baseline_seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        return _check_seeds(v)

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        from ..masking import strategy_requires

        # boxes, or the saliency maps a manifest's records name
        guided = [a.name for a in self.arms if a.pretrain and strategy_requires(a.strategy) & {"boxes", "saliency"}
                  and (a.rois or self.rois).source == "none"]
        if guided:
            raise ValueError(f"arms {guided} need ROIs: set rois.source (of the bench or the arm) to gt-boxes, "
                             "foreground, reconstruction-error, generic-prompt, meijering or manifest")
        mapless = [a.name for a in self.arms if a.pretrain and "saliency" in strategy_requires(a.strategy)
                   and (a.rois or self.rois).source not in MAP_SOURCES]
        if mapless:
            raise ValueError(f"arms {mapless} mask by saliency maps: give them rois: {{source: meijering}}, or "
                             "{source: manifest, path: LOC/rois.jsonl} from `mwm localize --save-saliency` / `mwm "
                             "importance` (boxes carry no maps)")
        targetless = [a.name for a in self.arms if (a.rois or self.rois).source not in MAP_SOURCES
                      and self.map_target(a)]
        if targetless:
            raise ValueError(f"arms {targetless} reconstruct Meijering maps (model.target): give them rois: "
                             "{source: meijering}, or {source: manifest, path: MAPS/rois.jsonl} from `mwm "
                             "importance meijering`")
        from ..train.methods import method_spec

        for m in dict.fromkeys(self.method_of(a) for a in self.arms if a.pretrain):  # a model.method of the blocks
            method_spec(m)  # "unknown pretraining method 'x'; choose one of [...]"
        maskless = [a.name for a in self.arms if a.pretrain and a.masking and not method_masks(self.method_of(a))]
        if maskless:
            raise ValueError(f"arms {maskless}: their method draws no masks; remove their masking")
        timed = ["pretrain"] * ("epochs" in self.pretrain) + [f"arms[{a.name}].options" for a in self.arms
                                                             if "epochs" in a.options]
        if self.pretrain_images is not None and timed:
            raise ValueError(f"pretrain_images sets every arm's epochs; remove epochs from {', '.join(timed)}")
        names = [a.name for a in self.arms]
        if self.baseline_seeds and not self.baseline_from:
            raise ValueError("baseline_seeds go to the arm baseline_from chooses; give baseline_from too")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline '{self.baseline}' is not an arm; arms are {names}")
        if self.baseline_from is not None:
            if self.baseline is not None:
                raise ValueError("give baseline (a fixed arm) or baseline_from (the best of several on val), not both")
            bad = [a for a in self.baseline_from if a not in names]
            if bad:
                raise ValueError(f"baseline_from names arms that do not exist: {bad}; arms are {names}")
        self._check_choices(names)
        aliases = [BASELINE_ALIAS, *(c.name for c in self.choose)]
        if BASELINE_ALIAS in names and any(BASELINE_ALIAS in (t.arms or []) for t in self.tasks):
            raise ValueError(f"an arm is named '{BASELINE_ALIAS}', which a task's arms use for the chosen baseline; "
                             "rename the arm")
        unknown = sorted({a for t in self.tasks for a in (t.arms or []) if a not in [*names, *aliases]})
        if unknown:
            raise ValueError(f"tasks name arms that do not exist: {unknown}; arms are {names} (and {aliases}, the "
                             "arms chosen on val)")
        if any(BASELINE_ALIAS in (t.arms or []) for t in self.tasks) and not (self.baseline_from or
                                                                               self.baseline_arm):
            raise ValueError(f"a task runs on '{BASELINE_ALIAS}' but the bench has no baseline: give baseline or "
                             "baseline_from")
        if self.tasks[0].arms is not None or self.tasks[0].seeds is not None:
            raise ValueError(f"the first task ('{self.tasks[0].label}') runs on every arm and seed: the baseline "
                             "is chosen and every arm is compared on it; restrict a later task instead")
        runs = [*self.all_seeds, *(s for c in self.choices for s in c.seeds)]
        stray = sorted({s for t in self.tasks for s in (t.seeds or []) if s not in runs})
        if stray:
            raise ValueError(f"tasks name seeds no arm runs: {stray}; the bench's seeds are {self.all_seeds}")
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"task names must be unique (give `name:` to repeated kinds): {labels}")
        return self

    def method_of(self, arm: ArmConfig) -> str | None:
        """The arm's pretraining method: its ``method``, else ``model.method`` of its ``options`` or of the bench's
        ``pretrain``, else spark; None for the no-pretraining arm."""
        if not arm.pretrain:
            return None
        if arm.method is not None:
            return arm.method
        opts = {**self.pretrain, **arm.options}
        model = opts.get("model")
        return (model.get("method") if isinstance(model, dict) else None) or "spark"

    def arm_model(self, arm: ArmConfig) -> dict[str, Any]:
        """The ``PretrainConfig.model`` fields of ``arm``: the bench's arch and size, ``model`` of the arm's
        ``options`` (else of the bench's ``pretrain``), the arm's ``model``, and its ``method`` when it names one.
        A shared ``pretrain.model`` key the arm's method does not have (but another registered method has: e.g.
        SparK's ``mask_stride`` for a contrastive arm) is left out for that arm; a key no method has stays (and fails
        validation, naming it)."""
        from ..train.methods import METHODS

        own = "model" in arm.options
        model = {"arch": self.arch, "size": self.size, **(arm.options if own else self.pretrain).get("model", {})}
        method = self.method_of(arm) or "spark"
        if not own and method != "spark" and method in METHODS:
            mine = METHODS[method].config.model_fields
            anyone = {f for spec in METHODS.values() for f in spec.config.model_fields}
            model = {k: v for k, v in model.items() if k in mine or k not in anyone}
        model.update(arm.model)
        if arm.method is not None:
            model["method"] = arm.method
        return model

    def map_target(self, arm: ArmConfig) -> bool:
        """The arm reconstructs a map, not the pixels (``model.target: meijering``, M&M reading (b)): it pretrains on
        the maps of its ROI source (a ``mwm importance meijering`` manifest)."""
        return arm.pretrain and self.arm_model(arm).get("target", "pixels") != "pixels"

    def strategy_of(self, arm: ArmConfig) -> str | None:
        """The arm's masking strategy; None without pretraining or with a method that draws no masks."""
        method = self.method_of(arm)
        return None if method is None or not method_masks(method) else arm.masking.get("strategy", "random")

    def arch_of(self, arm: ArmConfig) -> str:
        """The timm arch the arm's encoder has (its tasks build this): the bench's ``arch`` unless a pretraining
        arm's model options set another (e.g. a ViT for an MAE arm)."""
        return str(self.arm_model(arm).get("arch") or self.arch) if arm.pretrain else self.arch

    def seeds_of(self, arm: ArmConfig) -> list[int]:
        """The arm's own seeds, else the bench's."""
        return arm.seeds if arm.seeds is not None else self.seeds

    @property
    def all_seeds(self) -> list[int]:
        """Every seed any arm runs: the bench's, then arms' extra ones, in order of appearance."""
        return list(dict.fromkeys([*self.seeds, *(s for a in self.arms for s in (a.seeds or []))]))

    @property
    def out_dir(self) -> Path:
        return self.out or Path("runs") / "bench" / self.name

    def rois_for(self, arm: ArmConfig) -> RoiSourceConfig:
        return arm.rois or self.rois

    def _check_choices(self, names: list[str]) -> None:
        own = [c.name for c in self.choose]
        clash = sorted({n for n in own if own.count(n) > 1 or n in names or n == BASELINE_ALIAS})
        if clash:
            raise ValueError(f"choose: names must be unique and differ from the arms' and '{BASELINE_ALIAS}': "
                             f"{clash}")
        bad = sorted({a for c in self.choose for a in c.among if a not in names})
        if bad:
            raise ValueError(f"choose: among names arms that do not exist: {bad}; arms are {names}")

    @property
    def choices(self) -> list[ChoiceConfig]:
        """Every choice made on val: the baseline's (``baseline_from``, named 'baseline'), then ``choose``."""
        base = [ChoiceConfig.model_construct(name=BASELINE_ALIAS, among=list(self.baseline_from),
                                             seeds=list(self.baseline_seeds))] if self.baseline_from else []
        return [*base, *self.choose]

    @property
    def baseline_arm(self) -> str | None:
        """The fixed baseline (``baseline``, else the first random-masking arm); with ``baseline_from`` the
        choice depends on results: :func:`mwm.bench.tables.choose_baseline`."""
        if self.baseline_from:
            return None
        if self.baseline:
            return self.baseline
        return next((a.name for a in self.arms if self.strategy_of(a) == "random"), None)


def run_dir(cfg: BenchConfig, arm: str, seed: int) -> Path:
    """The folder of one (arm, seed): ``OUT/runs/ARM/seedS`` (its ``pretrain/`` and one folder per task)."""
    return cfg.out_dir / "runs" / arm / f"seed{seed}"
