"""Public testing tools for symphase and for plugin authors.

- :mod:`framework.testing.strategies`: hypothesis strategies for models and order
  parameters (symmetric, positive-definite covariances).
- :class:`framework.testing.NormalizationContract`: the contract every
  normalization must satisfy, as a pytest base class. Subclass it and provide a
  ``normalization`` fixture::

      import pytest
      from framework.testing import NormalizationContract
      from mynorm.plugin import Scaled

      class TestScaled(NormalizationContract):
          @pytest.fixture
          def normalization(self):
              return Scaled(c=2.0)
- :func:`assert_directional_derivative`: finite-difference check of a gradient.
"""

from framework.testing.contract import NormalizationContract, assert_directional_derivative

__all__ = ["NormalizationContract", "assert_directional_derivative"]
