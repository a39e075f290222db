"""Drop-rate schedules: the seed's linear rule, uniform, explicit lists and callables."""

import pytest

from sdsurgery import drop_rates, linear_rates


def test_linear_matches_the_seed_formula():
    assert linear_rates(8, 0.3) == [0.3 * i / 7 for i in range(8)]


def test_linear_with_one_block_is_p_max():
    assert drop_rates("linear", 0.3, 1) == [0.3]


def test_uniform_gives_every_block_p_max():
    assert drop_rates("uniform", 0.1, 3) == [0.1, 0.1, 0.1]


def test_explicit_list_is_used_as_is():
    assert drop_rates([0.0, 0.2], 0.5, 2) == [0.0, 0.2]


def test_explicit_list_of_wrong_length_raises():
    with pytest.raises(ValueError, match="2 rates but the model has 3"):
        drop_rates([0.0, 0.2], 0.5, 3)


def test_callable_gets_index_and_block_count():
    assert drop_rates(lambda i, n: i / (2 * n), 0.5, 2) == [0.0, 0.25]


def test_unknown_schedule_name_raises_with_choices():
    with pytest.raises(ValueError, match="'linear', 'uniform'"):
        drop_rates("cosine", 0.1, 3)


def test_rate_produced_outside_unit_interval_raises():
    with pytest.raises(ValueError, match="invalid rate"):
        drop_rates(lambda i, n: 1.0, 0.1, 2)


@pytest.mark.parametrize("p_max", [-0.1, 1.0])
def test_p_max_outside_unit_interval_raises(p_max):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_rates("linear", p_max, 3)
