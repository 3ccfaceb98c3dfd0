"""Approval triggers: which steps need a person's decision, and what a worker of an unapproved
step must not execute.

Pure decisions over an effective policy and the resolved programs of a step; the scheduler asks
them at plan time and the worker builder (agentd/policy/execset.py) enforces the second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from agentd.policy.effective import EffectivePolicy


def approval_triggers(policy: EffectivePolicy, executables: Sequence[str]) -> list[str]:
    """The policy's approval triggers this step matches (empty: it may run at once).

    Paths are compared as real paths (granted paths are bound at the same place in the
    worker), so /bin/rm cannot slip past exec:/usr/bin/rm on a merged-/usr host. An exec:
    trigger looks at what each task asks to run (argv[0]), not at what that runs in turn:
    inside the worker, `withheld_programs` keeps every other route to the program shut.
    """
    real = [os.path.realpath(exe) for exe in executables]
    hits = []
    for trigger in policy.approval_required_for:
        if trigger == "exec" or (trigger == "user_namespace" and policy.user_namespace):
            hits.append(trigger)
        elif trigger.startswith("exec:"):
            target = trigger.removeprefix("exec:")
            if target.endswith("/"):
                tree = os.path.realpath(target) + "/"
                matched = any(exe.startswith(tree) for exe in real)
            else:
                matched = os.path.realpath(target) in real
            if matched:
                hits.append(trigger)
    return hits


def withheld_programs(policy: EffectivePolicy, approved: bool) -> tuple[str, ...]:
    """What a worker of this step must not execute by any route: the programs (and trees) of
    the policy's exec: approval triggers, unless a person approved the step.

    argv[0] alone is not enough (a shell, Python or the loader can start a trigger), so the
    worker is built without them (agentd/policy/execset.py).
    """
    if approved:
        return ()
    return tuple(sorted(t.removeprefix("exec:").rstrip("/") or "/"
                        for t in policy.approval_required_for if t.startswith("exec:")))
