"""The client side of the 1,000,000-message test: pipelined requests with a credit window.

    python tests/helpers/load_client.py ENDPOINT N WINDOW

Sends N `ping` requests (payload = its number) to ENDPOINT keeping at most WINDOW in
flight, and checks that every request is answered exactly once with its own payload.
Prints `PROGRESS {"done": i}` ten times and `RESULT {...}` at the end; exits 1 on any loss,
duplicate or foreign reply.
"""

from __future__ import annotations

import json
import sys
import time

import zmq

from nexrl.bus.reqrep import Client


def main() -> int:
    endpoint, n, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = zmq.Context()
    client = Client(ctx, endpoint, sender="load", service="load-target", timeout=30.0, retries=0,
                    linger_ms=0)
    outstanding: dict[str, int] = {}
    answered = duplicates = foreign = 0
    sent = 0
    step = max(1, n // 10)
    t0 = time.monotonic()
    print("READY {}", flush=True)
    while answered < n:
        while sent < n and len(outstanding) < window:
            msg_id = client.send("ping", {"payload": sent})
            outstanding[msg_id] = sent
            sent += 1
        reply = client.recv_reply(30.0)
        if reply is None:
            print(f"RESULT {json.dumps(dict(ok=False, error='no reply within 30 s', answered=answered))}",
                  flush=True)
            return 1
        i = outstanding.pop(reply.reply_to, None)
        if i is None:
            duplicates += 1
            continue
        if reply.type != "ping.reply" or reply.body.get("payload") != i:
            foreign += 1
            continue
        answered += 1
        if answered % step == 0:
            print(f"PROGRESS {json.dumps({'done': answered})}", flush=True)
    took = time.monotonic() - t0
    ok = not outstanding and duplicates == 0 and foreign == 0
    print(f"RESULT {json.dumps(dict(ok=ok, answered=answered, duplicates=duplicates, foreign=foreign, missing=len(outstanding), seconds=took, per_s=n / took, discarded=client.discarded))}",
          flush=True)
    client.close()
    ctx.destroy(0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
