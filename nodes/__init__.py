"""The roles: one module (or small package) per node, each runnable alone with `nexrl-node ROLE`.

`ROLES` maps a role name to "module:Class". Classes are imported only when a node of that
role starts, so a role that needs no torch never imports it. A placement (or `nexrl-node`)
may also name a node class directly as "path/to/file.py:Class" for a custom node.
"""

ROLES: dict[str, str] = {}
