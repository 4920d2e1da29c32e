"""cachekd.schedules: every kind against hand-computed values, and validation."""

from __future__ import annotations

import math

import pytest

from cachekd.schedules import Schedule


def test_constant():
    s = Schedule("constant", start=0.3)
    assert [s.value(i, 10, e, 3) for i, e in ((0, 0), (5, 1), (10, 2))] == [0.3, 0.3, 0.3]


def test_epoch_linear_is_choobaca_decay_with_floor():
    s = Schedule("epoch_linear", start=1.0, end=0.3)
    # α_e = max(α_min, α_0 (1 − e/E)), E = 4: 1, 0.75, 0.5, 0.3 (floored from 0.25)
    assert [s.value(0, 100, e, 4) for e in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.3])
    # constant within an epoch, whatever the step
    assert s.value(0, 100, 1, 4) == s.value(99, 100, 1, 4)
    s2 = Schedule("epoch_linear", start=0.8, end=0.0)
    assert s2.value(0, 1, 1, 2) == pytest.approx(0.4)


def test_epoch_linear_in_a_run_of_two_or_more_epochs_is_per_epoch():
    s = Schedule("epoch_linear", start=0.9, end=0.5)
    # E = 2, 10 steps an epoch: epoch 0 holds 0.9 at every step, epoch 1 holds max(0.5, 0.45) = 0.5
    assert [s.value(i, 20, i // 10, 2) for i in range(10)] == pytest.approx([0.9] * 10)
    assert [s.value(i, 20, i // 10, 2) for i in range(10, 20)] == pytest.approx([0.5] * 10)
    # E = 3 (a run of 2.5 epochs rounds up): 0.9, 0.6, max(0.5, 0.3)
    assert [s.value(e * 10, 25, e, 3) for e in range(3)] == pytest.approx([0.9, 0.6, 0.5])


def test_epoch_linear_in_a_run_shorter_than_two_epochs_decays_per_step():
    # A run that ends inside its first epoch (E = 1) would hold start for ever; there e/E becomes s/S.
    s = Schedule("epoch_linear", start=0.9, end=0.5)
    values = [s.value(i, 8, 0, 1) for i in range(8)]
    assert values == pytest.approx([max(0.5, 0.9 * (1 - i / 8)) for i in range(8)])
    assert values[0] == pytest.approx(0.9) and values[-1] == pytest.approx(0.5)  # reaches the floor
    assert all(a >= b for a, b in zip(values, values[1:])) and values[1] < 0.9
    # a floor of 0 (allowed for τ) is never reached: the last step is s = S − 1
    t = Schedule("epoch_linear", start=2.0, end=0.0)
    assert t.value(3, 4, 0, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps"):
        s.value(0, 0, 0, 1)


def test_linear():
    s = Schedule("linear", start=1.0, end=0.2)
    assert s.value(0, 8, 0, 1) == pytest.approx(1.0)
    assert s.value(2, 8, 0, 1) == pytest.approx(0.8)
    assert s.value(4, 8, 0, 1) == pytest.approx(0.6)
    assert s.value(8, 8, 0, 1) == pytest.approx(0.2)
    assert s.value(20, 8, 0, 1) == pytest.approx(0.2)  # held at the end


def test_cosine():
    s = Schedule("cosine", start=2.0, end=0.0)
    assert s.value(0, 10, 0, 1) == pytest.approx(2.0)
    assert s.value(5, 10, 0, 1) == pytest.approx(1.0)
    assert s.value(10, 10, 0, 1) == pytest.approx(0.0, abs=1e-12)
    assert s.value(3, 10, 0, 1) == pytest.approx(1.0 + math.cos(math.pi * 0.3))
    values = [s.value(i, 10, 0, 1) for i in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_warmup_then_decay():
    s = Schedule("linear", start=1.0, end=0.0, warmup_steps=4)
    assert [s.value(i, 12, 0, 1) for i in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert s.value(8, 12, 0, 1) == pytest.approx(0.5)
    assert s.value(12, 12, 0, 1) == pytest.approx(0.0)
    c = Schedule("cosine", start=1.0, end=0.5, warmup_steps=2)
    assert c.value(1, 10, 0, 1) == pytest.approx(0.75)
    assert c.value(6, 10, 0, 1) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(kind="exponential"), "exponential"),
        (dict(kind="linear", start=math.nan), "start"),
        (dict(kind="linear", end="a"), "end"),
        (dict(kind="linear", warmup_steps=-1), "warmup_steps"),
        (dict(kind="epoch_linear", warmup_steps=3), "warmup_steps"),
    ],
)
def test_invalid_schedules_raise_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        Schedule(**kwargs)


def test_invalid_totals():
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("linear").value(0, 0, 0, 1)
    with pytest.raises(ValueError, match="total_epochs"):
        Schedule("epoch_linear").value(0, 1, 0, 0)
