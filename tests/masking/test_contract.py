"""The masking-strategy contract, checked for every registered strategy (as timm's tests run over
``list_models()``): a new strategy gets these tests by being registered. A toy strategy — "mask the brightest
cells", which needs the images — is defined and registered here in a few lines to show that a strategy is one class
plus registration, and that it runs in ``mwm pretrain``."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mwm.masking import (REQUIREMENTS, STRATEGIES, MaskingBatch, MaskingStrategy, StrategyConfig, boxes_tensor,
                         create_masker, masking_config, pool_importance, random_keep, realised_ratios,
                         register_strategy, topk_keep, visible_count)


# -- the toy strategy: one config class, one strategy class, registration ---------------------------------------
class BrightestConfig(StrategyConfig):
    strategy: Literal["brightest"] = "brightest"


@register_strategy("brightest")
class Brightest(MaskingStrategy):
    """Mask the brightest cells first (their mean intensity), exactly round(N · ratio) per image."""

    requires = frozenset({"images"})
    config_class = BrightestConfig

    def mask(self, b: MaskingBatch):
        keep = topk_keep(pool_importance(b.images.mean(1), b.grid), self.cfg.ratio, b.generator)
        return keep, realised_ratios(keep)


# -- a stateful toy: random masking that counts the outputs it is given (a stand-in for HPM's / AnatoMask's
# loss predictor and schedule) -----------------------------------------------------------------------------------
@register_strategy("counting")
class Counting(MaskingStrategy):
    """Uniform random masking at ``ratio``; counts the model outputs it received (``update``) and the batches
    that carried the previous step's outputs."""

    requires = frozenset({"model_outputs"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = self.with_outputs = 0

    def mask(self, b: MaskingBatch):
        self.with_outputs += b.outputs is not None and "loss" in b.outputs
        keep = random_keep(b.batch_size, b.grid, self.cfg.ratio, b.generator, b.device)
        return keep, realised_ratios(keep)

    def update(self, outputs):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen, "with_outputs": self.with_outputs}

    def load_state_dict(self, state):
        self.seen, self.with_outputs = state.get("seen", 0), state.get("with_outputs", 0)


# ---------------------------------------------------------------------------------------------------------------
NAMES = sorted(STRATEGIES)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_batch(b: int, grid: tuple[int, int], seed: int, px: int = 4, no_roi: tuple[int, ...] = ()) -> dict:
    """Every input any strategy may require, for a batch of ``b`` images of ``grid`` cells of ``px`` pixels:
    images, 0–2 boxes per image (none for the indices in ``no_roi``), saliency maps, ids and text tokens."""
    g = gen(seed + 1)
    h, w = grid
    lo = torch.rand(b, 2, 2, generator=g) * 0.6
    hi = lo + 0.05 + torch.rand(b, 2, 2, generator=g) * 0.35
    n_boxes = torch.randint(0, 3, (b,), generator=g).tolist()
    boxes = [[[*lo[i, j].tolist(), *hi[i, j].tolist()] for j in range(n_boxes[i] if i not in no_roi else 0)]
             for i in range(b)]
    bt, valid = boxes_tensor(boxes)
    return {"images": torch.rand(b, 3, h * px, w * px, generator=g), "boxes": bt, "valid": valid,
            "importance": torch.rand(b, h * px, w * px, generator=g), "ids": [f"img{i}" for i in range(b)],
            "text": torch.randint(0, 100, (b, 8), generator=g)}


def config_for(name: str, ratio: float) -> StrategyConfig:
    """``name``'s config at overall ``ratio`` (MWM's 0.8 / 0.2 for the strategies that take ROI ratios)."""
    fields = {"strategy": name, "ratio": ratio}
    if "ratio_in" in STRATEGIES[name].config.model_fields:
        fields.update(ratio_in=0.8, ratio_out=0.2)
    return masking_config(fields)


@settings(max_examples=25, deadline=None)
@given(grid=st.sampled_from([(2, 2), (4, 4), (7, 7), (3, 5), (8, 8), (14, 14)]), b=st.integers(1, 5),
       ratio=st.floats(0.05, 0.95), seed=st.integers(0, 10**6), data=st.data())
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, grid, b, ratio, seed, data):
    """Shape and dtype, the exact count the strategy promises (:func:`visible_count`) in every image — with an ROI
    or without one — statistics as 0-d tensors that match the mask, and the same mask for the same seed."""
    no_roi = tuple(data.draw(st.lists(st.integers(0, b - 1), max_size=b)))
    inputs = full_batch(b, grid, seed, no_roi=no_roi)
    cfg = config_for(name, ratio)
    strategy = create_masker(cfg)
    assert isinstance(strategy, MaskingStrategy) and strategy.requires <= set(REQUIREMENTS)
    keep, stats = strategy(MaskingBatch(b, grid, generator=gen(seed), **inputs))
    assert keep.shape == (b, 1, *grid) and keep.dtype == torch.bool
    n = visible_count(cfg, grid[0] * grid[1])
    if n is not None:
        assert (keep.flatten(1).sum(1) == n).all(), (name, keep.flatten(1).sum(1), n)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in stats.values())
    assert abs(float(stats["mask_ratio"]) - float((~keep).float().mean())) < 1e-6
    again, _ = create_masker(cfg)(MaskingBatch(b, grid, generator=gen(seed), **inputs))
    assert torch.equal(keep, again)
    fresh = create_masker(cfg)
    fresh.load_state_dict(strategy.state_dict())  # state round-trips (empty for the stateless ones)


@pytest.mark.parametrize("name", NAMES)
def test_missing_requirement_is_a_clear_error(name):
    """A strategy called without an input it requires says which one (model outputs are optional: None on the
    first step)."""
    needs = STRATEGIES[name].requires - {"model_outputs"}
    inputs = full_batch(2, (4, 4), 0)
    field = {"boxes": "boxes", "saliency": "importance", "images": "images", "text": "text"}
    for req in needs:
        without = {k: v for k, v in inputs.items() if k != field[req] and not (req == "boxes" and k == "valid")}
        with pytest.raises(ValueError, match=f"masking strategy '{name}' needs"):
            create_masker(config_for(name, 0.5))(MaskingBatch(2, (4, 4), generator=gen(0), **without))


def test_toy_masks_the_brightest_cells():
    img = torch.zeros(2, 3, 16, 16)
    img[0, :, :8] = 1.0  # top half bright
    img[1, :, :, 8:] = torch.linspace(0.2, 1, 8)  # right half, brighter to the right
    keep, stats = create_masker({"strategy": "brightest", "ratio": 0.5})(MaskingBatch(2, (4, 4), generator=gen(0),
                                                                                      images=img))
    assert not keep[0, 0, :2].any() and keep[0, 0, 2:].all()
    assert not keep[1, 0, :, 2:].any() and keep[1, 0, :, :2].all()
    assert set(stats) == {"mask_ratio"}


def test_toy_config_is_its_own_class_selected_by_strategy():
    from mwm.train import PretrainConfig

    cfg = PretrainConfig(data="x.npz", out="run", masking={"strategy": "brightest", "ratio": 0.5})
    assert type(cfg.masking) is BrightestConfig
    assert cfg.model_dump(mode="json")["masking"] == {"strategy": "brightest", "ratio": 0.5}
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")).masking == cfg.masking
    with pytest.raises(ValidationError, match="ratio_in"):  # not a field of the toy
        PretrainConfig(data="x.npz", out="run", masking={"strategy": "brightest", "ratio_in": 0.8})
    with pytest.raises(ValidationError, match="unknown masking strategy 'nope'"):
        PretrainConfig(data="x.npz", out="run", masking={"strategy": "nope"})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.synthetic import PhantomConfig, generate

    npz = tmp_path_factory.mktemp("contract") / "ph.npz"
    generate(PhantomConfig(n=16, size=64, seed=1)).save_npz(npz)
    return npz


def _pretrain_config(npz, out, masking, **kw):
    from mwm.train import PretrainConfig

    base = dict(data=npz, out=out, model={"arch": "resnet18", "size": 64, "mask_stride": 16}, accelerator="cpu",
                workers=0, batch_size=4, limit=4, epochs=1, warmup_epochs=0, recon_images=0, log_every=1,
                masking=masking)
    return PretrainConfig(**{**base, **kw})


def test_toy_runs_in_pretraining(phantoms, tmp_path):
    """The toy plugs into ``mwm pretrain`` with no other change: the loop hands it the (augmented, un-normalized)
    images; one step trains and the first keep-mask masks exactly half the cells."""
    from mwm.train import pretrain

    keeps = []
    cfg = _pretrain_config(phantoms, tmp_path / "run", {"strategy": "brightest", "ratio": 0.5}, recon_images=2)
    summary = pretrain(cfg, hook=lambda ev, info: keeps.append(info["keep"]) if ev == "step" else None)
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])
    assert keeps[0].shape == (4, 1, 4, 4) and (keeps[0].flatten(1).sum(1) == 8).all()


def test_visible_count_is_what_the_strategy_draws_on_odd_grids():
    """roi_overall holds the *masked* count at round(N · ratio), so on a 7 × 7 grid at 0.5 it keeps 25 cells; the
    loop used to tell MAE round(N · (1 − ratio)) = 24 for every strategy, and MAE's count check then failed."""
    cfg = masking_config({"strategy": "roi_overall", "ratio": 0.5})
    inputs = full_batch(3, (7, 7), 0)
    keep, _ = create_masker(cfg)(MaskingBatch(3, (7, 7), generator=gen(0), **inputs))
    assert visible_count(cfg, 49) == 25 and (keep.flatten(1).sum(1) == 25).all()
    assert visible_count(masking_config({"strategy": "random", "ratio": 0.5}), 49) == 24  # round half to even
    assert visible_count(masking_config({"strategy": "roi"}), 49) is None  # varies with the ROI's size


def test_stateful_strategy_gets_outputs_and_is_checkpointed(phantoms, tmp_path):
    """The loop hands a strategy that requires ``model_outputs`` each step's outputs (``update``, and the next
    batch's ``outputs``), saves its ``state_dict`` in the checkpoint and restores it on resume."""
    from mwm.train import pretrain
    from mwm.train.checkpoint import checkpoint_path, load_checkpoint

    out = tmp_path / "run"
    cfg = _pretrain_config(phantoms, out, {"strategy": "counting", "ratio": 0.5}, limit=8, epochs=2)
    pretrain(cfg, stop_at_epoch=1)  # 2 steps
    assert load_checkpoint(checkpoint_path(out))["masking"] == [{"seen": 2, "with_outputs": 1}]
    pretrain(cfg.model_copy(update={"resume": True}))  # restored, then 2 more steps
    assert load_checkpoint(checkpoint_path(out))["masking"][0]["seen"] == 4
