"""An evaluation over two "nodes": two `torchrun --nnodes 2` launchers on this machine, one gloo process each, with
their rendezvous on 127.0.0.1, write the same records as one process (the README's "Several machines" recipe)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from ddp_utils import find_free_port

import evaluate
from mglightning.models import create_model
from mglightning.reporting import read_records

ROOT = Path(__file__).resolve().parents[1]
E = "mglightning.explainers."
RECORD_COLUMNS = ["method", "index", "distance", "topk", "ssim", "moved"]


def write_config(folder: Path, batch_size: int = 2, max_samples: int = 4) -> Path:
    """A tiny evaluation on synthetic data: a random-weight softplus ResNet-18 (width 4, 16x16 images), three
    explainers (plain, noisy, iterative and noisy), four samples in batches of two by default."""
    torch.manual_seed(0)
    weights = folder / "resnet18_w4.pt"
    model = create_model("resnet18", num_classes=4, image_size=16, in_chans=3, width=4, activation="softplus")
    torch.save(model.state_dict(), weights)
    config = folder / "eval_tiny.yaml"
    config.write_text(
        f"""\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: {folder / 'logs'}, name: eval_tiny}}
model:
  classifier:
    arch: resnet18
    weights: {weights}
    model_kwargs: {{width: 4, activation: softplus}}
    mean: [0.5, 0.5, 0.5]
    std: [0.25, 0.25, 0.25]
  epsilon: 0.5
  attacks:
    topk: {{class_path: mglightning.attacks.TopKInterpretationAttack, init_args: {{num_steps: 2}}}}
  max_samples: {max_samples}
  grid_samples: 0
  explainers:
    simple_gradient: {{class_path: {E}SimpleGradient}}
    smoothgrad: {{class_path: {E}SmoothGrad, init_args: {{nt_samples: 3}}}}
    moreaugrad: {{class_path: {E}MoreauGrad, init_args: {{num_steps: 4, noise_samples: 2}}}}
data:
  class_path: mglightning.data.SyntheticDataModule
  init_args: {{batch_size: {batch_size}, num_samples: 40, num_classes: 4, image_size: 16, seed: 0}}
"""
    )
    return config


def run_folder(logs: Path) -> Path:
    (run_json,) = logs.rglob("run.json")
    return run_json.parent


def records(run_dir: Path) -> pd.DataFrame:
    table = read_records(run_dir)[RECORD_COLUMNS]
    return table.sort_values(["method", "index"]).reset_index(drop=True)


def test_two_nodes_write_the_records_of_one_process(tmp_path):
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    single.mkdir(), nodes.mkdir()
    evaluate.cli_main(["--config", str(write_config(single))])
    expected = records(run_folder(single / "logs"))

    config, port = write_config(nodes), find_free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(ROOT / "evaluate.py"), "--config", str(config),
             "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"],
            cwd=nodes, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    for rank, (launcher, output) in enumerate(zip(launchers, outputs)):
        assert launcher.returncode == 0, f"node {rank} failed:\n{output[-4000:]}"

    # Each node recorded its own share of the samples into the one run folder; together, every sample once.
    actual = records(run_folder(nodes / "logs"))
    assert len(actual) == 4 * 3
    pd.testing.assert_frame_equal(actual, expected, check_exact=False, atol=1e-5, rtol=0)
