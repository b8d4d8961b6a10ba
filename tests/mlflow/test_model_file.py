"""freezelab's model file: the module round-trips, and nothing else is ever unpickled."""

import os
import pickle

import pytest
import torch

from freezelab.trainers import model_file
from freezelab.trainers.checkpoint import LOGGED_MODEL_FILE, LOGGED_MODEL_REBUILD
from freezelab.trainers.models import build_model, read_state_dict


def _model(**head):
    model = build_model("test_resnet", 4, head=head or None, image_size=32)
    spec = model_file.spec_of("test_resnet", 4, head=head or None, image_size=32)
    return model_file.attach_spec(model.eval(), spec)


@pytest.mark.parametrize("head", [{}, {"pool": "avg", "hidden": [16], "dropout": 0.1}])
def test_a_model_file_loads_as_the_module_with_its_weights(tmp_path, head):
    model = _model(**head)
    path = tmp_path / LOGGED_MODEL_FILE
    torch.save(model, path, pickle_module=model_file)

    # What mlflow.pytorch does: a full unpickle, restricted by freezelab's Unpickler.
    loaded = torch.load(path, pickle_module=model_file, weights_only=False)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # Read as weights: torch's weights_only loader, no model built.
    assert f"{model_file.rebuild.__module__}.rebuild" == LOGGED_MODEL_REBUILD
    state = read_state_dict(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_a_file_that_would_run_code_is_refused_by_both_readers(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="not to posix.system"):
        torch.load(path, pickle_module=model_file, weights_only=False)
    with pytest.raises(ValueError, match="would need running its code"):
        read_state_dict(path)


def test_only_models_built_by_freezelab_are_written(tmp_path):
    with pytest.raises(pickle.PicklingError, match="Linear has no freezelab spec"):
        torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pth", pickle_module=model_file)
