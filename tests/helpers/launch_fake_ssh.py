"""A stand-in for `ssh` that runs the "remote" command on this machine, detached the way a
real remote command is: it is not a child of this process, it gets its stdin and stdout
through pipes this process relays (like an ssh channel), and this process exits with the
command's status. Kill this process and the command's stdin closes, exactly what happens on
the far side of a dropped ssh connection.

    python tests/helpers/launch_fake_ssh.py [-o Opt=val ...] TARGET COMMAND...

Used as `job.ssh_command: [python, tests/helpers/launch_fake_ssh.py]` in launcher tests.
If FAKE_SSH_LOG is set, each call appends "TARGET<TAB>COMMAND" to that file.
"""

from __future__ import annotations

import os
import sys
import threading

_WITH_ARG = set("bcDEeFIiJLlmOopQRSWw")  # ssh options that take a value


def parse(argv: list[str]) -> tuple[str, str]:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i]
        i += 1
        if len(flag) == 2 and flag[1] in _WITH_ARG:
            i += 1
    if i >= len(argv):
        sys.exit("fake ssh: no target given")
    return argv[i], " ".join(argv[i + 1:])


def _remote(command: str, in_r: int, out_w: int, st_w: int) -> None:
    """The "sshd" side (a grandchild, re-parented away from us): run, report the status."""
    cmd = os.fork()
    if cmd == 0:
        os.close(st_w)
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.execvp("sh", ["sh", "-c", command])
    os.close(in_r)
    os.close(out_w)
    _, status = os.waitpid(cmd, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        os.write(st_w, f"{128 - code if code < 0 else code}\n".encode())
    except OSError:
        pass  # the client is gone: nobody to tell
    os._exit(0)


def main() -> int:
    target, command = parse(sys.argv[1:])
    if os.environ.get("FAKE_SSH_LOG"):
        with open(os.environ["FAKE_SSH_LOG"], "a") as f:
            f.write(f"{target}\t{command}\n")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.close(in_w)
            os.close(out_r)
            os.close(st_r)
            _remote(command, in_r, out_w, st_w)
        os._exit(0)
    os.waitpid(pid, 0)
    for fd in (in_r, out_w, st_w):
        os.close(fd)

    def relay_stdin() -> None:
        try:
            while data := os.read(0, 65536):
                os.write(in_w, data)
        except OSError:
            pass
        finally:
            os.close(in_w)

    threading.Thread(target=relay_stdin, daemon=True).start()
    while data := os.read(out_r, 65536):
        os.write(1, data)
    status = os.read(st_r, 64).strip()
    return int(status) if status else 255


if __name__ == "__main__":
    sys.exit(main())
