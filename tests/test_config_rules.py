"""Claim: the Python API refuses what the CLI refuses, in the words of the API (config fields, never `--flags`).

The CLI says the same thing in flag words (tests/test_smooth.py, test_static.py and test_calibrate_cli.py pin
those); here the configs, `check_recipe` and `AdapterModel.add_adapter` are called directly.
"""

from __future__ import annotations

import pytest
from conftest import make_base

from edgelora.calibrate import check_calib_batches
from edgelora.config import LoraConfig, QuantConfig, check_recipe
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel

RESIDUAL = LoraConfig(r=2, init="int8-residual")


@pytest.mark.parametrize(("quant", "message"), [
    (None, r"^init='int8-residual' fits .* add the adapter with quant=QuantConfig\(mode='switchable'\)$"),
    (QuantConfig(mode="merged"), r"^init='int8-residual' fits .* only the switchable int8 recipe keeps"),
    (QuantConfig(mode="switchable", smoothing=0.5), r"^smoothing with init='int8-residual': .*; drop one of them$"),
])
def test_add_adapter_refuses_a_recipe_the_init_cannot_train_for(quant: QuantConfig | None, message: str) -> None:
    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=message) as exc:
        model.add_adapter("r", RESIDUAL, ["a", "b"], quant=quant)
    assert "--" not in str(exc.value)
    assert "r" not in model.configs and model.quant is None  # refused before anything changed
    with pytest.raises(EdgeloraError, match=message):
        check_recipe(RESIDUAL, quant)


def test_the_same_recipe_is_accepted_without_the_conflict() -> None:
    check_recipe(RESIDUAL, QuantConfig(mode="switchable"))
    check_recipe(LoraConfig(r=2), QuantConfig(mode="switchable", smoothing=0.5))
    model = AdapterModel(make_base("bert"))
    model.add_adapter("r", RESIDUAL, ["a", "b"], quant=QuantConfig(mode="switchable"))
    assert model.configs["r"].init == "int8-residual"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: QuantConfig(smoothing=1.5), r"^smoothing=1\.5 must be between 0 and 1"),
    (lambda: QuantConfig(smoothing=True), r"^smoothing=True must be between 0 and 1"),
    (lambda: check_calib_batches(0), r"^batches=0 must be a positive number of batches"),
])
def test_field_errors_name_the_field_not_a_flag(make, message: str) -> None:
    with pytest.raises(EdgeloraError, match=message) as exc:
        make()
    assert "--" not in str(exc.value)
