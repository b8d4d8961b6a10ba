"""The examples in the policy modules' docstrings run (example code no test runs rots)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "freezelab.policies",
    "freezelab.policies.apply",
    "freezelab.policies.base",
    "freezelab.policies.catalog",
    "freezelab.policies.groups",
    "freezelab.policies.io",
    "freezelab.policies.summary",
    "freezelab.logs",
    "freezelab.progress",
    "freezelab.trainers.models",
    "freezelab.trainers.shifts",
    "freezelab.trainers.metric_names",
    "freezelab.mlflow.tracking",
    "freezelab.mlflow.views",
    "freezelab.trainers.splits",
    "freezelab.trainers.image_files",
    "freezelab.advise.advice",
    "freezelab.advise.candidates",
    "freezelab.advise.costs",
    "freezelab.advise.features",
    "freezelab.advise.gradient_stats",
    "freezelab.advise.logme",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
