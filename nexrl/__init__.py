"""NexRL: post-train LLMs with reinforcement learning as a message-bus actor system.

Every role is its own process ("node"); nodes talk only through msgpack messages over
ZeroMQ (see proto/README.md). This package holds the shared mechanisms: the bus
(`nexrl.bus`), the node runtime (`nexrl.node`), configuration (`nexrl.config`), the RL
math (`nexrl.algorithms`), weight transfer and the inference client. The roles themselves
live in `nexrl.nodes`, the supervisor in `nexrl.launch`.
"""

__version__ = "0.1.0"
