"""A throwaway PostgreSQL server on loopback for tests (run as the postgres user under root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    return found[-1]


def available() -> bool:
    """Returns whether PostgreSQL's server binaries are installed."""
    return bool(_binary("initdb") and _binary("pg_ctl"))


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def server(databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[str]:
    """Yields 'postgresql://postgres@127.0.0.1:PORT' with the databases created; stops after."""
    # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    data_dir = tempfile.mkdtemp(prefix="prunesweep-pg-")
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pg_ctl = _binary("pg_ctl")
    try:
        subprocess.run(_as_postgres([_binary("initdb"), "-D", data_dir, "-A", "trust",
                                     "-U", "postgres"]), check=True, capture_output=True)
        subprocess.run(_as_postgres([pg_ctl, "-D", data_dir, "-l", f"{data_dir}/server.log",
                                     "-w", "-o", f"-p {port} -k {data_dir} "
                                     "-c listen_addresses=127.0.0.1", "start"]),
                       check=True, capture_output=True, timeout=60)
        for name in databases:
            subprocess.run(_as_postgres([_binary("createdb"), "-h", "127.0.0.1", "-p", str(port),
                                         "-U", "postgres", name]), check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", data_dir, "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)
