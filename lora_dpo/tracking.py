"""Extra metric trackers (report_to). metrics.jsonl is always written by the loop; these are optional and gated."""

from __future__ import annotations

import json
from pathlib import Path

from lora_dpo.errors import LoraDpoError


class _TensorBoard:
    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # availability checked by check_available

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path) -> None:
        import wandb  # availability checked by check_available

        self.run = wandb.init(project="lora-dpo", name=out.name, dir=str(out))

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb}


def check_available(names: list[str]) -> None:
    """Fail before anything is loaded or written when a requested tracker is not installed."""
    import importlib.util

    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
        if importlib.util.find_spec(module) is None:
            raise LoraDpoError(f"train.report_to: {name} is not installed; `pip install {module}` or remove it "
                               "from report_to") from None


def open_trackers(names: list[str], out: Path) -> list:
    return [_TRACKERS[n](out) for n in names]


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of run_dir/metrics.jsonl; a line cut short (a run killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
