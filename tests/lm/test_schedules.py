import math

import pytest

from lmlab.errors import ConfigError
from lmlab.lm.schedules import Schedule


def test_cosine_warms_up_linearly_then_decays_to_min():
    s = Schedule("cosine", max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way through the cosine: (max + min) / 2
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_constant_stays_at_max_after_warmup():
    s = Schedule("constant", max_lr=3e-4, min_lr=0.0, warmup_steps=5, total_steps=100)
    assert s(2) == pytest.approx(3e-4 * 3 / 5)
    assert all(s(i) == 3e-4 for i in range(5, 100))


def test_rewarm_starts_from_start_lr_and_reaches_new_max():
    s = Schedule("rewarm", max_lr=3e-4, min_lr=3e-5, warmup_steps=20, total_steps=200, start_lr=3e-5)
    assert s(0) == pytest.approx(3e-5 + (3e-4 - 3e-5) / 20)
    assert s(19) == pytest.approx(3e-4)
    assert s(200) == pytest.approx(3e-5)
    # no re-warming (the paper's baseline): the LR never rises above where it starts
    flat = Schedule("rewarm", max_lr=3e-5, min_lr=3e-5, warmup_steps=0, total_steps=100, start_lr=3e-5)
    assert max(flat(i) for i in range(100)) == pytest.approx(3e-5)
    assert not math.isnan(flat(0))


@pytest.mark.parametrize("kw", [dict(kind="linear"), dict(min_lr=1.0, max_lr=0.1), dict(warmup_steps=-1),
                                dict(total_steps=0), dict(max_lr=float("nan")), dict(max_lr=0.0), dict(min_lr=-1.0),
                                dict(start_lr=-1.0), dict(start_lr=5.0), dict(start_lr=float("nan"))])
def test_bad_schedules_are_refused(kw):
    with pytest.raises(ConfigError):
        Schedule(**kw)
