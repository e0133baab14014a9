"""owl's repair of DeepSpeed 0.19.8's ZeRO-3 universal load (owl.train.checkpoint), on the state
that load leaves: flat fp32 sub-groups sharing one Adam `step` tensor, every parameter group with
the first group's hyper-parameters. The whole resume is tests/integration/test_elastic_resume.py's
(ZeRO-3, 2 -> 1 -> 2 workers); this pins the repair itself in milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from owl.train.checkpoint import _repair_zero3_universal_load


def _loaded(tmp_path, saved_groups: list[dict]) -> SimpleNamespace:
    """A ZeRO-3 optimizer as DeepSpeed's universal load leaves it, and its universal folder."""
    flats = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))]
    adam = torch.optim.AdamW(
        [{"params": [flats[0]], "weight_decay": 0.0}, {"params": [flats[1]], "weight_decay": 0.1}]
    )
    step = torch.tensor(20.0)  # the load: state[fp32_flat]['step'] = one state_step, every group
    for flat in flats:
        adam.state[flat] = {
            "step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)
        }  # fmt: skip
    for group in adam.param_groups:  # the load: every group gets group 0's hyper-parameters
        group.update(lr=1e-3, weight_decay=0.0)
    (tmp_path / "zero").mkdir()
    torch.save({"param_groups": saved_groups}, tmp_path / "zero" / "optimizer_state.pt")
    return SimpleNamespace(fp32_partitioned_groups_flat=flats, optimizer=adam)


def test_each_sub_group_steps_its_own_count_with_its_own_hyper_parameters(tmp_path) -> None:
    saved = [{"lr": 1e-3, "weight_decay": 0.0, "params": [0]}, {"lr": 5e-4, "weight_decay": 0.1}]
    zero = _loaded(tmp_path, saved)
    _repair_zero3_universal_load(zero, tmp_path)
    adam = zero.optimizer
    steps = [adam.state[flat]["step"] for flat in zero.fp32_partitioned_groups_flat]
    assert steps[0] is not steps[1] and [s.item() for s in steps] == [20.0, 20.0]
    assert [(g["lr"], g["weight_decay"]) for g in adam.param_groups] == [(1e-3, 0.0), (5e-4, 0.1)]
    # One optimizer step, ZeRO-3's way: sub-group by sub-group, each `step` incremented in place
    # as torch's AdamW does (`step_t += 1`; its real step() is not called here: its first call
    # imports torch._dynamo, 13 s on this machine). Shared, the count would reach 22.
    for flat in zero.fp32_partitioned_groups_flat:
        adam.state[flat]["step"] += 1
    assert [adam.state[f]["step"].item() for f in zero.fp32_partitioned_groups_flat] == [21, 21]


def test_other_parameter_groups_than_saved_are_refused_in_one_line(tmp_path) -> None:
    zero = _loaded(tmp_path, [{"lr": 1e-3, "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="has 1 optimizer parameter groups and this stage 2"):
        _repair_zero3_universal_load(zero, tmp_path)
