"""The roles: one module (or small package) per node, each runnable alone with `nexrl-node ROLE`.

`ROLES` maps a role name to "module:Class". Classes are imported only when a node of that
role starts, so a role that needs no torch never imports it. A placement (or `nexrl-node`)
may also name a node class directly as "path/to/file.py:Class" for a custom node.
"""

ROLES: dict[str, str] = {
    "dataloader": "nexrl.nodes.dataloader:Dataloader",
    "rollout": "nexrl.nodes.rollout:Rollout",
    "pool": "nexrl.nodes.pool:Pool",
    "trainer": "nexrl.nodes.trainer:Trainer",
    "weight_sync": "nexrl.nodes.weight_sync:WeightSync",
    "validator": "nexrl.nodes.validator:Validator",
    "tracker": "nexrl.nodes.tracker:Tracker",
    "inference": "nexrl.nodes.inference.node:InferenceNode",
}
