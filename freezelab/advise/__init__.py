"""``freezelab advise``: which layers to freeze for this data, predicted from the
pretrained model and a sample of the target's training data before any fine-tuning.

The measurements and the ranking live here and import only ``policies`` and
``trainers`` (``logme``, ``features``, ``gradient_stats``, ``costs``, ``rules``,
``candidates``, ``measure``); ``freezelab.advise_run`` (the orchestration, above MLflow
and sweeps) checks the input, runs them on the driver or a Ray worker and logs the MLflow
run.
"""
