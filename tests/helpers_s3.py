"""A real S3-compatible server for the object-storage tests: moto's server mode in its own process
(``python -m moto.server``), on a free port, with a bucket; and a TCP relay in front of it that a
test can take away in the middle of a save (the server gone, as a network partition or a
restart of a server whose data is durable leaves it), then bring back.

The clients find the server the way a user's do, through the provider's environment:
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (moto accepts any) and
``AWS_MAX_ATTEMPTS`` (a server gone is reported after two attempts instead of five).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

BUCKET = "fxtrain-test"
SECRET = "fxtrain-secret-never-shown"  # moto accepts any; the tests look for it in every output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, log, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the S3 server exited with {proc.returncode}: "
                               f"{log.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"no server on port {port} after {timeout} s")


@contextlib.contextmanager
def server() -> Iterator[str]:
    """moto's S3 server in a process of its own; yields its endpoint URL."""
    port = _free_port()
    # its request log goes to a file: a pipe nobody reads fills up and stalls the server
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(port, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.kill()
            proc.wait()


def environment(endpoint: str) -> dict[str, str]:
    """The variables a client needs to reach ``endpoint`` (what a user sets for their store)."""
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "AKIAFXTRAINTESTKEY",
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "2"}


def make_bucket(endpoint: str, name: str = BUCKET) -> None:
    import boto3
    env = environment(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)


def objects(prefix: str) -> list[str]:
    """The keys under ``s3://<BUCKET>/<prefix>``, read with a client of its own (after the
    environment points at the server)."""
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        return sorted(fs.find(f"{BUCKET}/{prefix}"))
    except FileNotFoundError:
        return []


class Relay:
    """A TCP relay on its own port in front of ``endpoint``: what the clients are pointed at.

    ``cut_after(n, marker)``: once ``n`` requests whose first line holds ``marker`` went through,
    every connection is closed and the port refuses new ones (the server gone away), until
    ``restore()``.
    """

    def __init__(self, endpoint: str):
        self.target = ("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._marker, self._left = None, None
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _counts(self, data: bytes) -> bool:
        """Whether ``data`` (from a client) starts a request that uses up the last of the
        allowed ones."""
        if self._marker is None:
            return False
        line = data.split(b"\r\n", 1)[0]
        if line.split(b" ")[0] in (b"PUT", b"POST", b"GET", b"HEAD", b"DELETE") and \
                self._marker in line:
            self._left -= 1
            return self._left < 0
        return False

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = {client: upstream, upstream: client}
        try:
            while not self.cut.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is client and self._counts(data):
                        self.go_away()
                        return
                    pair[s].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def cut_after(self, n: int, marker: str) -> None:
        self._marker, self._left = marker.encode(), n

    def go_away(self) -> None:
        """Closes every connection and the port: the server is gone."""
        self.cut.set()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._conns = []
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def restore(self) -> None:
        """The server is back, on the same port."""
        self._marker, self._left = None, None
        self.cut.clear()
        self._listen()

    def close(self) -> None:
        self.go_away()


def sharded_gpt2_saves_async(out: str, ckpt: str) -> None:
    """dist_worker's ``sharded_gpt2_saves`` with asynchronous saves (each rank uploads its
    shards on the writer's thread): 3 compiled steps of a tiny GPT-2 sharded over the ranks,
    checkpoints at steps 2 and 3 in ``ckpt`` (keeping the latest); rank 0 writes the steps."""
    import torch

    import dist_worker
    import fxtrain as fx
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(0))
    state = fx.shard(fx.TrainState.create(dist_worker.tiny_gpt2(), fx.optim.adamw(1e-2)))
    step = fx.make_train_step(dist_worker.gpt2_loss)
    with fx.checkpoint.CheckpointManager(ckpt, async_save=True, keep_latest=1) as manager:
        end = fx.fit(state, step, fx.data.Batches(ids, 2, seed=0), max_steps=3,
                     checkpoint=manager, callbacks=[fx.callbacks.checkpoint_policy(every=2)])
        steps = manager.all_steps()
    if fx.distributed.rank() == 0:
        torch.save({"steps": steps, "step": int(end.step)}, os.path.join(out, "rank0.pt"))
