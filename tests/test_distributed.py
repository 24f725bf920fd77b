"""Many processes (torchrun, gloo on loopback): distributed evaluation gives one process's
metrics, and negatives from the global batch give one process's loss and gradients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from distributed_worker import BATCH, loss_and_gradients, share_of, training_batch
from test_models import small_model

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    tests = str(Path(__file__).parent)
    env = subprocess_env(OMP_NUM_THREADS="1")
    env["PYTHONPATH"] += f":{tests}"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("preset", ["vsepp", "scan-t2i-ave"])
def test_global_negatives_of_two_processes_equal_one_process_with_the_whole_batch(tmp_path, preset):
    torchrun(str(WORKER), preset, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    model = small_model(preset).eval()
    # one process scores every pair with gradients; the two rescore the active pairs (SCAN)
    whole = share_of(training_batch(model), slice(0, BATCH))
    one_loss, one_grads = loss_and_gradients(model, model, whole, global_batch=False, active_pairs=False)
    assert two["loss"].item() == pytest.approx(one_loss.item(), rel=1e-5)
    assert two["grads"].keys() == one_grads.keys()
    for name, grad in one_grads.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_and_evaluation_under_torchrun_match_one_process(tmp_path):
    from itmatch.cli import main as itmatch

    data, run = tmp_path / "data", tmp_path / "run"
    assert itmatch(f"make-synthetic {data} --train 40 --dev 10 --test 20 --regions 6 --feature-dim 16".split()) == 0
    sizes = "--set model.embed_size=16 --set model.text.word_dim=16 --set train.global_negatives=true"
    train = f"-m itmatch.cli train --model scan-t2i-ave --data {data} --out {run} --epochs 1 --batch-size 8 --quiet"
    torchrun(*f"{train} {sizes}".split())
    history = torch.load(run / "last.pt", weights_only=True)["state"]["history"]
    assert len(history) == 1 and "dev_rsum" in history[0]  # the dev split scored by both processes
    evaluate = f"evaluate {run / 'best.pt'} --data {data} --split test --quiet --json"
    done = torchrun(*f"-m itmatch.cli {evaluate} {tmp_path / 'two.json'}".split())
    assert done.stdout.count("rSum") == 1 and "by 2 processes" in done.stdout  # rank 0 alone reports
    assert itmatch(f"{evaluate} {tmp_path / 'one.json'}".split()) == 0
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    for direction in ("i2t", "t2i"):
        assert two[direction] == pytest.approx(one[direction])
    assert two["pairs_scored"] == one["pairs_scored"] == 20 * 100
