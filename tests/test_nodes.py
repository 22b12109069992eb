"""More than one machine: two torchrun "nodes" of one process each, on loopback, rendezvous through
c10d as on a cluster. They log the losses of one process with grad_accum=2 (DDP and FSDP), write one
checkpoint that a single process resumes, and a node that cannot see data_dir stops both with one
line naming the path and the node."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.train import TrainConfig, read_metrics, train
from tests.test_parallel import config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(train_inputs):
    return train_inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(cfg: TrainConfig, port: int) -> list[str]:
    """What each node of a cluster runs (the Slurm script's line): 2 nodes of 1 process, c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}", "-m", "helpers.train", *cfg.to_args()]


def two_nodes(cfg: TrainConfig, second_prefix: tuple = ()):
    """Both nodes started together; (return code, stderr) of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = node_command(cfg, free_port())
    procs = [subprocess.Popen(list(prefix) + cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
             for prefix in ((), second_prefix)]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train(config(inputs, out))
    return read_metrics(out)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_train_as_one_process_and_one_process_resumes_them(parallel, inputs, one_process, tmp_path):
    out = tmp_path / "nodes"
    for rc, err in two_nodes(config(inputs, out, parallel=parallel)):
        assert rc == 0, err[-3000:]
    nodes = read_metrics(out)
    assert list(nodes["step"]) == [0, 2, 4]
    for name in ("train_loss", "val_loss"):
        assert list(nodes[name]) == pytest.approx(list(one_process[name]), rel=1e-5)
    # the checkpoint was written once (by global rank 0), whole: one process continues it from step 2
    shutil.copytree(out, tmp_path / "resumed")
    for f in (tmp_path / "resumed").glob("step_0000004.*"):
        f.unlink()
    train(config(inputs, tmp_path / "resumed", init="resume"))
    resumed = read_metrics(tmp_path / "resumed")
    assert list(resumed["step"]) == [0, 2, 4]
    for name in ("train_loss", "val_loss"):
        assert list(resumed[name]) == pytest.approx(list(nodes[name]), rel=1e-5)


@pytest.mark.slow
def test_a_node_that_cannot_see_data_dir_stops_both_in_one_line(inputs, tmp_path):
    """The second node runs in its own mount namespace, where an empty filesystem hides data_dir:
    both processes stop with the same one-line error naming data_dir and the node that lacks it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode:
        pytest.skip("no private mount namespaces here (unshare -m needs root)")
    data = tmp_path / "data"
    shutil.copytree(inputs / "data", data)
    hide = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{data}" && exec "$0" "$@"')
    results = two_nodes(config(inputs, tmp_path / "out", data_dir=str(data)), second_prefix=hide)
    for rc, err in results:
        assert rc != 0
        line = next(l for l in err.splitlines() if l.startswith("error: "))
        assert f"data_dir={data}: no prepared data on node {socket.gethostname()} (node rank" in line
        assert "every node sees" in line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_slurm_script_trains(inputs, tmp_path):
    """cluster/slurm.sbatch on a one-node 'cluster': stand-ins for scontrol and srun (srun runs its
    command once, as it would on each node) and Slurm's variables; the job really trains."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit=1
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cfg = config(inputs, tmp_path / "out", max_iters=2)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "42", "RDZV_PORT": str(free_port()), "GPUS_PER_NODE": "1",
           "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "cluster" / "slurm.sbatch"), *cfg.to_args()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(read_metrics(tmp_path / "out")["step"]) == [0, 2]
