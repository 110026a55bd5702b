"""Command-line entry points: nexrl-node (run one node) and nexrl-bus (inspect the bus)."""
