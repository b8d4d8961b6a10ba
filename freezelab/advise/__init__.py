"""``freezelab advise``: which layers to freeze for this data, found by short budgeted
fine-tuning of the candidate policies, with the pretrained model's signals on a sample
of the target's training data reported beside the ranking as explanations.

The measurements live here and import only ``policies`` and ``trainers``: ``logme``,
``features``, ``gradient_stats``, ``head_fit`` and ``bn_shift`` measure, ``signals``
holds and prints what they found, ``measure`` (``measure_signals``) runs them on a
config; ``costs`` and ``candidates`` describe the policies to search. The signals
explain; they do not rank. ``freezelab.advise_run`` (the orchestration, above MLflow
and sweeps) checks the input, runs the search and the measurements on the driver or a
Ray worker and logs the MLflow run.
"""
