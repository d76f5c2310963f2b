"""Every registered normalization satisfies the published contract."""

from __future__ import annotations

import pytest

import framework
from framework.testing import NormalizationContract


@pytest.fixture(params=framework.list_normalizations())
def normalization(request: pytest.FixtureRequest) -> framework.Normalization:
    return framework.get_normalization(request.param)


class TestEveryRegisteredNormalization(NormalizationContract):
    """The contract, parametrised over every installed normalization."""


def test_batchnorm_with_gain_and_eps_is_still_exact() -> None:
    norm = framework.get_normalization("batchnorm", gamma=1.7, eps=0.2)
    assert norm.is_diagonal_scale()
    assert not norm.scale_invariant
    assert norm.to_dict() == {"name": "batchnorm", "gamma": 1.7, "beta": 0.0, "eps": 0.2}


def test_batchnorm_with_shift_leaves_the_diagonal_scale_family() -> None:
    assert not framework.get_normalization("batchnorm", beta=0.5).is_diagonal_scale()


class TestBatchnormVariants(NormalizationContract):
    @pytest.fixture(params=[{"gamma": 1.7, "eps": 0.2}, {"beta": 0.5}])
    def normalization(self, request: pytest.FixtureRequest) -> framework.Normalization:
        return framework.get_normalization("batchnorm", **request.param)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'gama' for normalization "
                       r"'batchnorm'; valid options: 'gamma', 'beta', 'eps'"):
        framework.get_normalization("batchnorm", gama=2.0)


def test_invalid_option_value_is_named() -> None:
    with pytest.raises(ValueError, match=r"'gamma' must be > 0.0, got -1.0"):
        framework.get_normalization("batchnorm", gamma=-1)
