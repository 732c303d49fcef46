"""BestOnVal: the bookkeeping every transfer loop selects with."""

from __future__ import annotations

import torch

from mwm.transfer.selection import BestOnVal


def _net(v: float) -> torch.nn.Linear:
    net = torch.nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(v)
    return net


def test_keeps_the_best_state_and_stops_after_patience():
    keep = BestOnVal(patience=2)
    net = _net(0.0)
    seen = []
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.7, 0.65], 1):  # a tie is not an improvement
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        seen.append(keep.update(score, epoch, net))
        if keep.should_stop:
            break
    assert seen == [True, True, False, False] and epoch == 4  # stopped after 2 evaluations without improvement
    assert (keep.best, keep.best_epoch, keep.bad) == (0.7, 2, 2)
    assert keep.restore(net) and net.weight.item() == 2.0  # epoch 2's weights, not the last ones


def test_copies_are_detached_tuples_compare_and_nan_first_still_restores():
    keep = BestOnVal(patience=None, device="cpu")
    net = _net(1.0)
    keep.update((0.5, -1.0), 1, net)
    with torch.no_grad():
        net.weight.fill_(9.0)  # changing the model must not change the kept copy
    assert keep.state["weight"].item() == 1.0
    assert keep.update((0.5, -0.5), 2, net)  # lexicographic: the second key breaks the tie
    assert not keep.should_stop
    nan = BestOnVal(patience=1)
    assert nan.update(float("nan"), 1, net) and nan.restore(net)
    assert not BestOnVal().restore(net)  # nothing selected: nothing loaded
