"""AnatoMask (2D, on SparK): the EMA teacher's actual errors under its own random mask rank the cells, the cells it
saw never count as hard, its decay ramps over a quarter of the run, and the student's loss is SparK's. (The bench
arm runs in tests/train/test_hpm.py; the registry contract in tests/train/test_method_contract.py.)"""

from __future__ import annotations

import pytest
import torch

from mwm.masking.policies import hard_then_random_keep
from mwm.mim.loss import masked_mse
from mwm.train import PretrainConfig
from mwm.train.methods import MaskedViews
from mwm.train.methods.anatomask import AnatoMaskMethod, teacher_errors

from .helpers import prepared_method


@pytest.fixture(scope="module")
def anato(tiny_npz, tmp_path_factory):
    cfg = PretrainConfig(data=tiny_npz, out=tmp_path_factory.mktemp("anato") / "r", epochs=8,
                         model={"method": "anatomask", "arch": "resnet18", "size": 64, "mask_stride": 8,
                                "decoder_width": 64, "teacher_ratio": 0.25, "alpha_max": 1.0},
                         masking={"strategy": "random", "ratio": 0.75})
    return prepared_method(cfg)


def test_visible_cells_never_count_as_hard():
    """Even with the highest scores, cells outside ``eligible`` (what the teacher saw) are never in the hard set;
    with fewer eligible cells than n_hard, all of them are masked and the rest is random."""
    B = 32
    g = torch.Generator().manual_seed(0)
    eligible = torch.rand(B, 8, 8, generator=g) < 0.5
    scores = torch.where(eligible, torch.rand(B, 8, 8, generator=g), 10.0)  # the teacher's visible cells score highest
    keep = hard_then_random_keep(scores, 0.75, 20, g, eligible)
    masked = ~keep.flatten(1)
    assert (masked.sum(1) == 48).all()
    s = scores.masked_fill(~eligible, float("-inf")).flatten(1)
    hardest = s.argsort(1, descending=True)[:, :20]
    n_eligible = eligible.flatten(1).sum(1)
    full = n_eligible >= 20
    assert masked.gather(1, hardest)[full].all()
    # the visible-to-teacher cells are masked only by the random part: not always (top-k on raw scores would)
    assert not masked[~eligible.flatten(1)].all()
    few = torch.zeros(1, 8, 8, dtype=torch.bool)
    few[0, 0, :5] = True
    m1 = ~hard_then_random_keep(torch.rand(1, 8, 8, generator=g), 0.75, 20, g, few).flatten(1)
    assert m1[0, :5].all() and m1.sum() == 48


def test_teacher_errors_are_zero_where_it_saw(anato):
    x = anato.normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    keep = hard_then_random_keep(torch.zeros(2, 8, 8), 0.25, 0, torch.Generator().manual_seed(2))
    err = teacher_errors(anato.teacher.module, x, keep)
    assert err.shape == (2, 8, 8)
    assert (err[keep[:, 0]] == 0).all() and (err[~keep[:, 0]] > 0).all()
    # its masked mean is the teacher's own SparK loss
    out = anato.teacher.module(x, keep)
    assert (err.sum() / (~keep).sum()).item() == pytest.approx(masked_mse(x, out["pred"], keep).item(), rel=1e-5)
    raw = teacher_errors(anato.teacher.module, x, keep, target="pixels")  # the official script's raw-patch target
    assert not torch.allclose(raw, err) and (raw[keep[:, 0]] == 0).all()


def test_student_masks_the_teachers_hardest(anato):
    """Teacher ratio 0.25 (16 of 64 cells), α = 1 at the last epoch: all 16 cells the teacher had to reconstruct
    are hard (48 ≥ 16), so the student masks them, plus 32 of the 48 the teacher saw at random."""
    assert isinstance(anato, AnatoMaskMethod) and anato.n_mask == 48
    anato.on_epoch_start(7)
    assert anato.n_hard == 48
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    state = anato.ctx.generator.get_state()
    scores, eligible = anato.teacher_scores(anato.normalize(x))
    assert eligible.flatten(1).sum(1).eq(16).all() and (scores[~eligible] == 0).all()
    anato.ctx.generator.set_state(state)  # views() draws the same teacher mask
    masked = ~anato.views((x, None, None)).keep.flatten(1)
    assert (masked.sum(1) == 48).all() and masked[eligible.flatten(1)].all()
    assert anato.views((x, None, None)).stats["mask_ratio"].item() == pytest.approx(0.75)


def test_ema_decay_ramps_over_a_quarter_of_the_run(anato):
    """8 epochs → ramp over 8 // 4 = 2 (pretrain_AntoMask.py): 0.999, 0.99945, then 0.9999; the hard share is
    alpha_max·(t+1)/T."""
    decays, shares = [], []
    for t in range(4):
        anato.on_epoch_start(t)
        decays.append(anato.teacher.decay)
        shares.append(anato.n_hard)
    assert decays == pytest.approx([0.999, 0.99945, 0.9999, 0.9999])
    assert shares == [6, 12, 18, 24]  # ⌊48·(t+1)/8⌋


def test_student_loss_is_sparks(anato):
    x = anato.normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    keep = hard_then_random_keep(torch.rand(2, 8, 8), 0.75, 10, torch.Generator().manual_seed(5))
    loss, logs = anato.training_step(MaskedViews(x, keep, {"mask_ratio": torch.tensor(0.75)}))
    out = anato.model(x, keep)
    assert loss.item() == pytest.approx(masked_mse(x, out["pred"], keep).item(), rel=1e-6)
    assert set(anato.state_dict()) >= {"model", "ema", "teacher"}
