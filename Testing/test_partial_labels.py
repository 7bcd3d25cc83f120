"""Partial labels (IDEALTrain.training.partial_labels): unreviewed voxels never act as labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from IDEALTrain.errors import IdealError
from IDEALTrain.training.losses import dice_ce_loss
from IDEALTrain.training.partial_labels import (
    PARTIAL,
    UNLABELLED,
    allowed_classes,
    class_set_value,
    distillation_loss,
    partial_dice_ce_loss,
    reviewed_labels,
)


def test_on_ordinary_labels_the_loss_is_the_usual_dice_ce():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=generator)
    target = torch.randint(0, 4, (3, 16, 16), generator=generator)
    assert partial_dice_ce_loss(logits, target).item() == pytest.approx(dice_ce_loss(logits, target).item(), rel=1e-6)


def test_reviewed_labels_keep_labels_only_where_reviewed():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[:, 0, :2] = 1  # RV, never reviewed
    labels[:, 2:, 2:] = 3  # LV
    out = reviewed_labels(labels, {3: [1]}, slice_axis=0, num_classes=4)
    assert (out[[0, 2]] == UNLABELLED).all()  # slices with nothing reviewed
    assert (out[1][labels[1] == 3] == 3).all()
    not_lv = class_set_value([0, 1, 2])
    assert not_lv == PARTIAL | 0b0111 and (out[1][labels[1] != 3] == not_lv).all()  # RV and background: only "not LV"
    allowed = allowed_classes(torch.from_numpy(out).long(), 4)
    assert allowed[0].all() and allowed[1, :, 0, 0].tolist() == [True, True, True, False]
    assert allowed[1, :, 3, 3].tolist() == [False, False, False, True]
    with pytest.raises(IdealError, match="outside the volume"):
        reviewed_labels(labels, {3: [3]}, 0, 4)
    with pytest.raises(IdealError, match="not a structure"):
        reviewed_labels(labels, {0: [1]}, 0, 4)


def test_unreviewed_voxels_never_act_as_labels():
    """Whatever the unreviewed voxels hold (the model's RV, background), the loss and its gradient there do not move."""
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 4:, 4:] = 3
    labels[:, :3, :3] = 1  # the model's uncorrected RV
    target = torch.from_numpy(reviewed_labels(labels, {3: [0]}, 0, 4)).long()
    other = labels.copy()
    other[:, :3, :3] = 0  # the same case if the RV had been background: identical partial labels
    assert torch.equal(target, torch.from_numpy(reviewed_labels(other, {3: [0]}, 0, 4)).long())
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    partial_dice_ce_loss(logits, target).backward()
    assert logits.grad[1].abs().max() == 0  # the unreviewed slice gives no gradient at all
    # Swapping background and RV logits there (both allowed) leaves the loss unchanged.
    base = partial_dice_ce_loss(logits.detach(), target)
    moved = logits.detach().clone()
    moved[0, :2, :3, :3] = moved[0, :2, :3, :3].flip(0)  # swap background and RV logits there
    assert partial_dice_ce_loss(moved, target).item() == pytest.approx(base.item(), rel=1e-6)


def test_distillation_keeps_the_old_split_only_where_labels_leave_it_open():
    target = torch.tensor([[[3, class_set_value([0, 1, 2])], [UNLABELLED, UNLABELLED]]])
    teacher = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[5.0, 0.0], [0.0, 0.0]]]])
    assert distillation_loss(teacher, teacher, target).item() == pytest.approx(0.0, abs=1e-7)
    student = teacher.clone()
    student[0, 3, 0, 0] = -5.0  # differs only where the label is certain (LV): no distillation there
    assert distillation_loss(student, teacher, target).item() == pytest.approx(0.0, abs=1e-7)
    student = teacher.clone()
    student[0, 1, 0, 1] = -3.0  # forgets the RV where only "not LV" is known
    assert distillation_loss(student, teacher, target).item() > 0.1
