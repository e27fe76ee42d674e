"""Which rank died: when a collective fails because a peer's process is gone, say which one.

gloo reports a lost peer as "Connection closed by peer [10.0.0.2]:45123" and NCCL as an aborted
communicator; neither names the rank. At setup every rank records each rank's (host, pid); when
a rank's step then fails with such an error, the ranks on this host whose process no longer runs
(gone, or a zombie) are named in front of the original message. Ranks on other hosts cannot be
checked from here: the message says so.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

import torch.distributed as dist

#: Errors of a collective whose peer went away (gloo, NCCL, the TCP store).
LOST_PEER = re.compile(r"Connection (closed|reset) by peer|Broken pipe|NCCL communicator was aborted|"
                       r"recvBytes failed|sendBytes failed|Socket Timeout|Connection refused", re.IGNORECASE)


def gather_processes() -> list[tuple[str, int]]:
    """(hostname, pid) of every rank, by global rank (a collective: call on every rank at setup)."""
    mine = (socket.gethostname(), os.getpid())
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [tuple(x) for x in out]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:  # Linux: the state field follows "(comm)"
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError, PermissionError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _chain(exception: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exception is not None and exception not in out and len(out) < 10:
        out.append(exception)
        exception = exception.__cause__ or exception.__context__
    return out


def explain_lost_peer(exception: BaseException, processes: list[tuple[str, int]], rank: int,
                      wait_s: float = 3.0) -> str | None:
    """A sentence naming the dead rank(s), when ``exception`` (or what caused it, e.g. a pipeline
    stage's wrapped error) is a lost-peer error (else None). A dying process may still be
    listed for a moment after its sockets closed: this waits up to ``wait_s`` for it to go."""
    import time

    if not processes or not any(LOST_PEER.search(str(e)) for e in _chain(exception)):
        return None
    host = socket.gethostname()
    local = [r for r, (h, _) in enumerate(processes) if r != rank and h == host]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [r for r in local if not _running(processes[r][1])]
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    remote = sorted({h for h, _ in processes if h != host})
    if dead:
        names = ", ".join(f"rank {r} (pid {processes[r][1]})" for r in dead)
        return (f"[lightning_scale] {names} on this host stopped running; rank {rank}'s collective failed because of it "
                f"(see that rank's own output for why it stopped)")
    where = f"; ranks on {', '.join(remote)} cannot be checked from here" if remote else ""
    return (f"[lightning_scale] a peer of rank {rank} closed its connection; every rank on this host is still "
            f"running{where}")


def annotate(exception: BaseException, sentence: str) -> None:
    """Put ``sentence`` in front of the exception's message (Lightning re-raises the same object)."""
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{sentence}. {exception.args[0]}", *exception.args[1:])
    else:
        exception.args = (sentence, *exception.args)
