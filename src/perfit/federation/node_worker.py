"""A node's long-lived worker, so that a round on the Deployment Engine costs compute, not start-up.

Flower 1.42 starts a fresh ClientApp process for every message on a Deployment Engine node (its
subprocess isolation; docs/deployment.md), so each message would pay the imports (torch,
transformers, peft), the model load and the tokenisation of the client's rows again. On a node
whose config has a `state-dir`, the ClientApp (`client_app`, which imports neither torch nor
perfit's client code) hands each message to this worker instead, and the worker runs the same
handlers (`handlers`) with its ClientTask (model, tokenizer, tokenised rows) kept from the messages
before. Node config `worker=0` turns it off.

The worker is a cache, never the node's memory: the node's state (`Context.state`, and the files
in the state-dir) travels to the worker with each message and back with the reply, so a worker
that dies loses nothing. A message that cannot reach a worker starts another, and where that fails
too runs in the ClientApp's own process.

Lifecycle and access: the first ClientApp that finds no worker answering starts one (under a lock
in the state-dir) in its own session. It exits when the SuperNode that started it is gone (its pid
is watched) or after `IDLE_SECONDS` without a message. It listens on 127.0.0.1 only, on a port it
writes with a random key to `<state-dir>/worker.json` (mode 0600, the owner's alone); a connection
must prove it holds the key (the HMAC challenge of `multiprocessing.connection`)."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import fcntl
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from perfit.federation.node_store import STATE_DIR

WORKER_FILE = "worker.json"
IDLE_SECONDS = 1800.0
"""A worker with no message for this long exits (a federation's rounds come minutes apart at most)."""
START_SECONDS = 60.0
"""How long a ClientApp waits for a worker it started to listen before it runs the message itself."""
WATCH_SECONDS = 0.5

log = logging.getLogger(__name__)


def process_age_seconds() -> float:
    """How long this process has lived (what a fresh ClientApp process spent before its handler)."""
    import psutil

    return max(time.time() - psutil.Process().create_time(), 0.0)


def wanted(context: Context) -> Path | None:
    """The node's state-dir, where its worker lives, or None where messages run in this process (no
    state-dir: a simulation's node, or `worker=0`)."""
    state_dir = context.node_config.get(STATE_DIR)
    if not state_dir or str(context.node_config.get("worker", "1")) in ("0", "false", "False"):
        return None
    return Path(str(state_dir)).expanduser()


class HandlerError(Exception):
    """The handler raised in the worker something no builtin exception type describes."""


def forward(state_dir: Path, handler: str, msg: Message, context: Context, **kwargs: Any) -> Message | None:
    """Run `handlers.<handler>(msg, context, **kwargs)` in the node's worker: the reply, with
    `context.state` updated as the handler left it; None where no worker could be reached twice."""
    for attempt in range(2):
        try:
            conn = _connect(state_dir, fresh=attempt > 0)
        except (OSError, TimeoutError) as err:
            log.warning("node worker in %s not reachable (%s)", state_dir, err)
            continue
        try:
            with conn:
                header = {"handler": handler, "kwargs": kwargs}
                conn.send_bytes(json.dumps(header).encode())
                conn.send_bytes(message_to_proto(msg).SerializeToString())
                conn.send_bytes(context_to_proto(context).SerializeToString())
                answer = json.loads(conn.recv_bytes())
                if "error" not in answer:
                    reply = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
                    state = context_from_proto(ProtoContext.FromString(conn.recv_bytes())).state
                    returned = time.time()
        except (EOFError, OSError) as err:  # the worker died mid-message: nothing it held is lost
            log.warning("node worker in %s dropped the message (%s)", state_dir, err)
            continue
        if "error" in answer:  # the handler's own error (outside the `try`: an OSError of the
            raise _handler_error(answer)  # handler's is the node's error, not a dead worker)
        for name in list(context.state.keys()):
            del context.state[name]
        for name, record in state.items():
            context.state[name] = record
        metrics = reply.content["metrics"] if reply.has_content() and "metrics" in reply.content else None
        if metrics is not None and "setup_seconds" in metrics:  # the reply's way back is overhead too
            metrics["setup_seconds"] = float(metrics["setup_seconds"]) + max(returned - answer["finished"], 0.0)
        return reply
    log.warning("running the message in the ClientApp's process instead")
    return None


def _handler_error(answer: dict) -> Exception:
    """The handler's error, raised again here as its nearest builtin type, with its text."""
    kind = getattr(builtins, answer["error"], None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(answer["text"])
    return HandlerError(f"{answer['error']}: {answer['text']}")


def _connect(state_dir: Path, fresh: bool) -> Connection:
    """A connection to the node's worker: the one `worker.json` names, else (or when `fresh`) a new
    one started now. A lock in the state-dir keeps two messages from starting two."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "worker.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not fresh:
            with contextlib.suppress(OSError, ValueError, KeyError, EOFError):
                return _client(state_dir)
        (state_dir / WORKER_FILE).unlink(missing_ok=True)
        _spawn(state_dir)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if (state_dir / WORKER_FILE).is_file():
                return _client(state_dir)
            time.sleep(0.05)
    raise TimeoutError(f"no worker listened within {START_SECONDS:.0f} s (its log: {state_dir / 'worker.log'})")


def _client(state_dir: Path) -> Connection:
    address = json.loads((state_dir / WORKER_FILE).read_text())
    return Client(("127.0.0.1", int(address["port"])), authkey=bytes.fromhex(address["key"]))


def _spawn(state_dir: Path) -> None:
    """Start a worker in its own session (it outlives this message's process), watching this
    process's parent: the SuperNode, which starts a ClientApp process per message."""
    command = [sys.executable, "-m", "perfit.federation.node_worker", str(state_dir), "--watch", str(os.getppid())]
    with (state_dir / "worker.log").open("ab") as output:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                         start_new_session=True)  # fmt: skip


def serve(state_dir: Path, watch: int, idle_seconds: float = IDLE_SECONDS) -> None:
    """Answer messages one at a time until the watched process is gone or none came for
    `idle_seconds`."""
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    _write_private(state_dir / WORKER_FILE, {"port": listener.address[1], "key": key.hex(), "pid": os.getpid()})
    activity = {"last": time.monotonic(), "busy": False}
    threading.Thread(target=_watch, args=(state_dir, watch, idle_seconds, activity), daemon=True).start()
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError) as err:  # a connection without the key, or one that hung up
            log.warning("refused a connection: %s", err)
            continue
        activity["busy"] = True
        try:
            with conn:
                _answer(conn)
        except (OSError, EOFError) as err:
            log.warning("the ClientApp hung up: %s", err)
        finally:
            activity.update(busy=False, last=time.monotonic())


def _answer(conn: Connection) -> None:
    from perfit.federation import handlers  # imported once, on the first message

    header = json.loads(conn.recv_bytes())
    msg = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
    context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
    try:
        reply = getattr(handlers, header["handler"])(msg, context, **header["kwargs"])
    except Exception as err:  # the ClientApp raises it again, so the server sees the node's error
        traceback.print_exc()
        builtin = next(kind for kind in type(err).__mro__ if getattr(builtins, kind.__name__, None) is kind)
        conn.send_bytes(json.dumps({"error": builtin.__name__, "text": str(err)}).encode())
        return
    conn.send_bytes(json.dumps({"finished": time.time()}).encode())
    conn.send_bytes(message_to_proto(reply).SerializeToString())
    conn.send_bytes(context_to_proto(context).SerializeToString())


def _watch(state_dir: Path, watch: int, idle_seconds: float, activity: dict) -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        idle = not activity["busy"] and time.monotonic() - activity["last"] > idle_seconds
        if idle or not alive(watch):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((state_dir / WORKER_FILE).read_text())["pid"] == os.getpid():
                    (state_dir / WORKER_FILE).unlink()
            os._exit(0)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _write_private(path: Path, value: dict) -> None:
    """Write, readable by this user alone, then rename: a reader never sees half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.unlink(missing_ok=True)
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        json.dump(value, handle)
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="A perfit node's long-lived worker (started by its ClientApp).")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--watch", type=int, required=True, help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.state_dir, args.watch, args.idle_seconds)


if __name__ == "__main__":
    main()
