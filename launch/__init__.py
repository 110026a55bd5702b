"""The supervisor behind `nexrl-launch`: placement parsing, spawning, supervision.

    placement.py   the placement file: schema, validation, and the entry points nexrl-node /
                   nexrl-bus use (node_layers_from_placement, bus_config_from_placement)
    resolve.py     placement -> plan: names, GPUs, ports, commands, env, directory, recipe
    cli.py         `nexrl-launch`: validate everything, write the run dir, --dry-run
    supervisor.py  start, wait for ready, watch (exits, heartbeats), restart, ordered shutdown
    noderun.py     the launcher's per-node record and small helpers
    control.py     the supervisor's request socket (job.stop, ping)
    spawn.py       start a node locally or over ssh; kill its whole tree
    remote.py      the watchdog every node runs under (`python -m nexrl.launch.remote`)
    logs.py        per-node log files and the prefixed console stream
"""
