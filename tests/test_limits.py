"""The worker's limits as settings: read from the environment at the edge, one variable each,
documented where operators look, and handed to the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdtrain.settings import SERVICE_ENV_VARS, ServiceSettings
from consumer.limits import LIMIT_VARIABLES, DatasetLimits, format_bytes, over_limit
from snunet_cbam.data.check import DEFAULT_MAX_IMAGE_PIXELS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_each_limit_is_read_from_its_variable_and_the_rest_default(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env({"CDTRAIN_DATA_DIR": str(tmp_path), "CDTRAIN_MAX_DATASET_OBJECTS": "500",
                                         "CDTRAIN_CACHE_MAX_BYTES": "0", "CDTRAIN_MAX_IMAGE_PIXELS": ""})
    assert settings.limits == DatasetLimits(max_dataset_objects=500, cache_max_bytes=0)
    every = {var: str(1000 + i) for i, var in enumerate(LIMIT_VARIABLES.values())}
    limits = ServiceSettings.from_env({"CDTRAIN_DATA_DIR": str(tmp_path), **every}).limits
    assert {LIMIT_VARIABLES[name]: str(value) for name, value in limits.model_dump().items()} == every


@pytest.mark.parametrize("var, value, problem", [
    ("CDTRAIN_MAX_IMAGE_PIXELS", "lots", "CDTRAIN_MAX_IMAGE_PIXELS: Input should be a valid integer"),
    ("CDTRAIN_MAX_DATASET_OBJECTS", "0", "CDTRAIN_MAX_DATASET_OBJECTS: Input should be greater than or equal to 1"),
    ("CDTRAIN_CACHE_MAX_BYTES", "-1", "CDTRAIN_CACHE_MAX_BYTES: Input should be greater than or equal to 0"),
])
def test_a_bad_value_is_refused_naming_the_variable(tmp_path: Path, var: str, value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"^invalid worker limit: {problem}"):
        ServiceSettings.from_env({"CDTRAIN_DATA_DIR": str(tmp_path), var: value})


def test_every_limit_variable_is_documented_and_defaults_agree() -> None:
    readme = README.read_text()
    for var in LIMIT_VARIABLES.values():
        assert var in SERVICE_ENV_VARS, var
        assert f"`{var}`" in readme, var
    # The ML core's default (the CLI's) and the worker's are one number.
    assert DatasetLimits().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


def test_the_message_names_the_measure_the_limit_and_the_variable() -> None:
    assert over_limit("max_dataset_objects", "dataset s3://b/p/ holds", "1,234,567 objects", "1,000,000",
                      "split the dataset or raise the limit") == (
        "dataset s3://b/p/ holds 1,234,567 objects, over the limit of 1,000,000 (CDTRAIN_MAX_DATASET_OBJECTS on "
        "the workers); split the dataset or raise the limit")
    assert format_bytes(999) == "999 bytes"
    assert format_bytes(3 * 2**30 + 2**29) == "3,758,096,384 bytes (3.5 GiB)"
