"""``embed_stage.py`` on a CUDA device: the embedding stage vs a bare encode, both on the GPU.

Skips cleanly (exit 0, one line saying why) where torch sees no CUDA device. On a GPU the model's
forward passes are cheap and the per-task costs (process start, import, model load and copy to the
device) weigh more, so the stage runs with a larger forward-pass batch (256).

    .venv/bin/python benchmarks/embed_stage_gpu.py [embed_stage.py options, --smoke among them]
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed (pip install '.[local]')")
        return 0
    if not torch.cuda.is_available():
        print("skipped: torch sees no CUDA device on this machine")
        return 0
    import embed_stage

    print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    embed_stage.main(["--device", "cuda", "--request-batch-size", "256", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
