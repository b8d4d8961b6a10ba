"""freezelab: freeze-policy experiments for fine-tuning pretrained vision backbones.

Freeze policies are plain data (:mod:`freezelab.policies`); Ray Train runs the
fine-tuning (:mod:`freezelab.trainers`); MLflow tracks it (:mod:`freezelab.mlflow`).
"""

__version__ = "0.1.0"

from freezelab.logs import configure as _configure_logging  # noqa: E402

_configure_logging()
