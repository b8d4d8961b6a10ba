"""Freeze policies: the catalog, the registry, serialization, and plans.

>>> from freezelab import policies
>>> sorted(policies.list_policies())[:3]
['bitfit', 'full', 'gradual']
"""

from freezelab.policies import catalog as _catalog  # noqa: F401  (registers the catalog)
from freezelab.policies.apply import apply, is_pinned_eval
from freezelab.policies.base import (
    AnyPolicy,
    FreezePlan,
    FreezePolicy,
    PolicyError,
    from_dict,
    get_policy_class,
    list_policies,
    register_policy,
)
from freezelab.policies.groups import LayerGroup, find_group, layer_groups
from freezelab.policies.io import dump_policy, load_policy

__all__ = [
    "AnyPolicy",
    "FreezePlan",
    "FreezePolicy",
    "LayerGroup",
    "PolicyError",
    "apply",
    "dump_policy",
    "find_group",
    "from_dict",
    "get_policy_class",
    "is_pinned_eval",
    "layer_groups",
    "list_policies",
    "load_policy",
    "register_policy",
]
