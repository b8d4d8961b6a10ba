"""Overrides that shrink the built-in transfer study to seconds, for the tests that run it."""

# A tiny model, 1 + 2 epochs, two policies, one seed; the pretraining in the test's
# process, the fine-tuning runs as Tune trials.
SMALL_STUDY = [
    "seeds=[0]",
    "select=null",  # each policy at one rate (the selection stage is tested on its own)
    "base.model.name=test_resnet",
    "base.scaling.num_workers=0",
    "base.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=2",
    "policies=[{type: full}, {type: head_only}]",
]
