"""Two Ray nodes on this machine, on 127.0.0.1 only, and malmm batches across both:

  1. the records of `--ray HOST:PORT` equal those of the plain run (one process, no Ray);
  2. the second node is lost mid-batch (its processes killed with SIGKILL): its input goes
     to the other node, and no record is lost or written twice.

    python examples/ray_multinode.py VIDEO_FOLDER [MODEL]     (MODEL: default tiny-random)

Why not two `ray start` nodes: Ray 2.60 turns `--node-ip-address=127.0.0.1` into the
machine's outward address (its servers then listen on every interface), and with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a node on 127.0.0.1, `ray start --address`
refuses to add a second node. Ray's own test cluster (ray.cluster_utils.Cluster) starts real
nodes (a raylet each) without that check. A real cluster is set up as the README says
("Many machines").
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

# Read when ray is imported: node addresses 127.0.0.1, servers bound to it; one token for all.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import psutil  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

OPTS = ["--frames", "8", "--memory", "4", "--beams", "1", "--max-tokens", "3"]


def malmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malmm_cli", *args], capture_output=True, text=True)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timings(records: list[dict]) -> dict[str, dict]:
    return {r["input"]: {k: v for k, v in r.items() if k != "timings"} for r in records}


def listening_addresses() -> set[str]:
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            found |= {c.laddr.ip for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return found


def main(folder: str, model: str) -> None:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"malmm-multinode-{os.getpid()}"
    work.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        print(f"nodes: 2 (head at {cluster.address}); Ray listens on: {sorted(listening_addresses())}")
        options = ["--model", model, *OPTS, "--ray", cluster.address, "--workers", "2", "--cpus-per-worker", "1"]

        print("== 1. a batch on both nodes against the plain run")
        plain = malmm("caption", folder, "--model", model, *OPTS, "-q", "--json")
        (work / "plain.jsonl").write_text(plain.stdout)
        both = malmm("caption", folder, *options, "-o", str(work / "both.jsonl"))
        print(both.stderr.strip())
        a, b = without_timings(load(work / "plain.jsonl")), without_timings(load(work / "both.jsonl"))
        print(f"records: plain {len(a)}, on Ray {len(b)}; equal: {a == b}")

        print("== 2. the second node lost mid-batch")
        lost = work / "lost.jsonl"
        driver = subprocess.Popen([sys.executable, "-m", "malmm_cli", "caption", folder, *options, "--frames", "60",
                                   "-o", str(lost)], stderr=subprocess.PIPE, text=True)
        while driver.poll() is None and not (lost.exists() and lost.stat().st_size):
            time.sleep(0.05)
        cluster.remove_node(second, allow_graceful=False)  # SIGKILL to its raylet and workers
        print("killed node 2 after the first record")
        _, err = driver.communicate()
        print("\n".join(line for line in err.splitlines() if line.startswith("malmm:")))
        inputs = [r["input"] for r in load(lost)]
        print(f"inputs: {len(a)}; records: {len(inputs)}, distinct {len(set(inputs))}, "
              f"missing {sorted(set(a) - set(inputs))}, errors {sum('error' in r for r in load(lost))}")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python examples/ray_multinode.py VIDEO_FOLDER [MODEL]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "tiny-random")
