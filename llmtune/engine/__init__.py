"""The shared trainer core. The only package that imports deepspeed."""

from __future__ import annotations

import sys
from typing import Any


def import_deepspeed() -> Any:
    """Import deepspeed once, hiding mlflow from it: DeepSpeed's autotuner (which llmtune never runs) imports
    mlflow when it is installed, about a second of every run's start-up (3 s on a busy machine). mlflow stays
    importable afterwards for `train.report_to: [mlflow]`. Importing this package imports no torch (validate
    reads engine/trackers.py): deepspeed comes in on the first call."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
        return deepspeed
    import deepspeed

    return deepspeed
