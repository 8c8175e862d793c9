"""One job across two "nodes": two network namespaces joined by a veth pair, each
with its own address, one rank per node, started by torchrun's multi-node rendezvous
(as on a cluster without ssh). Needs root and iproute2; skipped with the reason otherwise."""
import os
import shutil
import subprocess
import sys

import pytest

from codistill.distributed import free_port

from conftest import MICRO, ROOT, launch_env

ADDRS = ("10.77.0.1", "10.77.0.2")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"cd{os.getpid() % 100000}"
    names, links = (f"{tag}n0", f"{tag}n1"), (f"{tag}v0", f"{tag}v1")
    made = _ip("netns", "add", names[0])
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        steps = [("netns", "add", names[1]),
                 ("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for ns, link, addr in zip(names, links, ADDRS):
            steps += [("link", "set", link, "netns", ns),
                      ("-n", ns, "addr", "add", f"{addr}/24", "dev", link),
                      ("-n", ns, "link", "set", link, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot build the veth pair here (ip {' '.join(step)}: {result.stderr.strip()})")
        yield names, links
    finally:
        for ns in names:
            _ip("netns", "del", ns)


def test_one_job_over_two_network_namespaces(two_nodes, tmp_path):
    names, links = two_nodes
    port = str(free_port())
    procs = []
    for node, (ns, link) in enumerate(zip(names, links)):
        env = launch_env(GLOO_SOCKET_IFNAME=link)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", ADDRS[0], "--master_port", port,
               "launch/train.py", "--config", str(MICRO), f"output_dir={tmp_path}", "train.max_steps=3"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "world: 2 rank(s) on cpu (launcher)" in logs[0]
    assert (tmp_path / "checkpoints" / "step_00000003" / "manifest.json").exists()
