"""Successive halving within groups: each group's trials meet only their own rungs."""

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from freezelab.sweep.schedulers import GroupedASHA, GroupOf

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _trial(trial_id: str, group: str):
    return SimpleNamespace(trial_id=trial_id, config={"trial": {"name": trial_id, "group": group}})


def _report(scheduler, trial, epoch: int, val_acc: float) -> str:
    return scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "val_acc": val_acc})


def _scheduler(**asha):
    scheduler = GroupedASHA(GroupOf("group"), **{"max_t": 8, "grace_period": 2, **asha})
    assert scheduler.set_search_properties("val_acc", "max")
    return scheduler


def test_a_trial_is_compared_with_its_own_group_only():
    scheduler = _scheduler(reduction_factor=3)
    assert scheduler.rungs() == [2, 6]
    strong, weak_other_group, weak_same_group = (
        _trial("a1", "full"),
        _trial("b1", "head_only"),
        _trial("a2", "full"),
    )
    for trial in (strong, weak_other_group, weak_same_group):
        scheduler.on_trial_add(None, trial)
    assert _report(scheduler, strong, 2, 0.9) == CONTINUE
    # A far worse trial of another group is the first of its own group: it goes on.
    assert _report(scheduler, weak_other_group, 2, 0.1) == CONTINUE
    # The same value in the strong trial's group falls behind it: stopped at the rung.
    assert _report(scheduler, weak_same_group, 2, 0.1) == STOP
    assert scheduler.stopped == {"a2": 2}
    # Between rungs nothing is decided.
    assert _report(scheduler, strong, 3, 0.1) == CONTINUE


def test_a_trial_at_its_last_epoch_is_never_stopped():
    # rf 2 from 2 puts a rung at 8, the last epoch: a trial there must end on its own
    # (its run writes its results), whatever it scored.
    scheduler = _scheduler(reduction_factor=2)
    first, second = _trial("a1", "g"), _trial("a2", "g")
    for trial in (first, second):
        scheduler.on_trial_add(None, trial)
    for epoch in (2, 4):
        assert _report(scheduler, first, epoch, 0.9) == CONTINUE
        assert _report(scheduler, second, epoch, 0.95) == CONTINUE
    assert _report(scheduler, first, 8, 0.9) == CONTINUE
    assert _report(scheduler, second, 8, 0.1) == CONTINUE
    assert scheduler.stopped == {}


def test_a_restored_trial_joins_its_group():
    scheduler = _scheduler(reduction_factor=3)
    first = _trial("a1", "g")
    scheduler.on_trial_add(None, first)
    assert _report(scheduler, first, 2, 0.8) == CONTINUE
    # Tune restores an experiment's unfinished trials without adding them again.
    restored = _trial("a2", "g")
    assert _report(scheduler, restored, 2, 0.5) == STOP


def test_a_sweep_can_halve_within_each_policy():
    # A sweep's trial entries hold the policy as a mapping: each policy is a group, so a
    # policy's learning rates compete with each other, not with another policy's.
    from freezelab.sweep.space import SweepConfig

    full = {"trial": {"policy": {"type": "full"}, "params": {"optimizer.lr": 0.1}}}
    probe = {"trial": {"policy": {"type": "head_only"}, "params": {"optimizer.lr": 0.1}}}
    full_low = {"trial": {"policy": {"type": "full"}, "params": {"optimizer.lr": 0.01}}}
    scheduler = GroupedASHA(GroupOf("policy"), max_t=8, grace_period=2, reduction_factor=3)
    scheduler.set_search_properties("val_acc", "max")
    trials = [
        SimpleNamespace(trial_id=name, config=config)
        for name, config in (("full", full), ("probe", probe), ("full_low", full_low))
    ]
    assert _report(scheduler, trials[0], 2, 0.9) == CONTINUE
    assert _report(scheduler, trials[1], 2, 0.2) == CONTINUE  # the first of its policy
    assert _report(scheduler, trials[2], 2, 0.5) == STOP
    sweep = SweepConfig.model_validate(
        {
            "name": "s",
            "base": {},
            "space": {"policies": [{"type": "full"}]},
            "asha": {"within": "policy"},
        }
    )
    assert sweep.asha.within == "policy"


def test_a_group_stops_training_when_its_epochs_are_spent():
    # advise's budget: a group's trials train at most group_epochs in all, counted from
    # their reports, whatever ASHA would let through; other groups are not charged.
    scheduler = _scheduler(reduction_factor=3, group_epochs=10)
    first, second, other = _trial("a1", "g"), _trial("a2", "g"), _trial("b1", "h")
    for trial in (first, second, other):
        scheduler.on_trial_add(None, trial)
    for epoch in range(1, 9):  # the first trial trains all 8 epochs: 8 spent
        assert _report(scheduler, first, epoch, 0.5) == CONTINUE
    # The second does better at the rung (ASHA would keep it), but the group has 2
    # epochs left: it stops at its second report.
    assert _report(scheduler, second, 1, 0.9) == CONTINUE
    assert _report(scheduler, second, 2, 0.9) == STOP
    assert scheduler.stopped == {"a2": 2}
    # Another group has its own count.
    for epoch in range(1, 9):
        assert _report(scheduler, other, epoch, 0.5) == CONTINUE


def test_rates_in_step_never_all_stop_short_of_the_end():
    # Three rates side by side, tied at every rung (ASHA keeps ties): the cap (18) is
    # reached at epoch 6 with nothing finished. The most advanced live trial (the first
    # of the tie) goes on to the end; the others stop at their next report.
    scheduler = _scheduler(reduction_factor=3, group_epochs=18)
    trials = [_trial(f"a{i}", "g") for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    actions = {}
    for epoch in range(1, 9):
        for trial in trials:
            if trial.trial_id in scheduler.stopped:
                continue
            actions[(trial.trial_id, epoch)] = _report(scheduler, trial, epoch, 0.5)
    # The cap is reached at a2's epoch 6 (6 + 6 + 6): a2 stops there, a1 at its next
    # report (7); a0, the first of the tie, trains to the end.
    assert scheduler.stopped == {"a1": 7, "a2": 6}
    assert all(actions[("a0", epoch)] == CONTINUE for epoch in range(1, 9))
    # The group trained 8 + 7 + 6 = 21 epochs, within what advise's plan charges: the
    # cap, one epoch of each other rate past it, and the spared rate's rest (8 - 18 / 3).
    assert sum(scheduler.stopped.values()) + 8 <= 18 + 2 + (8 - 6)
