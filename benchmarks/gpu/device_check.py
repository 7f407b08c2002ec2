"""Device placement on a GPU, for real: a short sinusoid meta-training with a checkpoint and a resume,
then a meta-test, under ``tests/training/devicecheck.py``'s checker, in fp32, bf16 and fp16; then the
GPU's checkpoint evaluated on the CPU. Writes ``device_check.json`` into ``--out``.

    python benchmarks/gpu/device_check.py --device cuda --out "$OUT"
    python benchmarks/gpu/device_check.py --device cpu --out /tmp/x    # the same on a CPU (fp16 refused)

Each row: the precision and path (vmap / loop), wall time, the violations the checker found (tensors
made without a device, operators with a tensor off the device; empty is the goal), the fp16 loss
scale at the end, and the validation MSE, so a broken precision shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))

from devicecheck import DeviceChecker  # noqa: E402

from innerloop.training.checkpoint import load_checkpoint  # noqa: E402
from innerloop.training.config import Config  # noqa: E402
from innerloop.training.evaluate import meta_test  # noqa: E402
from innerloop.training.loop import meta_train  # noqa: E402
from innerloop.training.run import build_algorithm, build_family, identity, load_for_eval  # noqa: E402


def one(device: str, precision: str, vectorize: str, iterations: int) -> dict:
    cfg = Config().override({"model.hidden": [40, 40], "train.meta_batch_size": 25, "train.validate_every": 5,
                             "train.val_tasks": 50, "train.log_every": 1, "execution.device": device,
                             "execution.precision": precision, "execution.vectorize": vectorize})
    family = build_family(cfg)
    row: dict = {"precision": precision, "vectorize": vectorize}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            first, resumed = build_algorithm(cfg, family), build_algorithm(cfg, family)
            with DeviceChecker(device, raise_on_exit=False) as check:
                half = cfg.override({"train.iterations": iterations // 2}).train
                meta_train(first, family, half, tmp, identity=identity(cfg, "maml"), progress=False)
                whole = cfg.override({"train.iterations": iterations}).train
                meta_train(resumed, family, whole, tmp, identity=identity(cfg, "maml"), progress=False)
                res = meta_test(resumed, family, "test", 100, steps=1)
            row.update(ok=True, violations=dict(check.violations), host_without_device=dict(check.host),
                       test_mse_1_step=res.per_step[1].mean,
                       param_device=str(next(resumed.parameters()).device))
            last = load_checkpoint(Path(tmp) / "last.pt")
            row["loss_scale"] = (last.get("extra") or {}).get("loss_scale")
            row["checkpoint_devices"] = sorted({str(t.device) for t in last["state"].values()})
            # the checkpoint written on this device, evaluated on the CPU
            _, on_cpu = load_for_eval(Path(tmp) / "best.pt", {"execution.device": "cpu",
                                                              "execution.precision": "fp32"})
            row["best_on_cpu_mse_1_step"] = meta_test(on_cpu, family, "test", 100, steps=1).per_step[1].mean
        except Exception as err:  # fp16 on a CPU is refused: that is a result too
            row.update(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
        row["wall_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rows = []
    for precision, vectorize in (("fp32", "auto"), ("fp32", "loop"), ("bf16", "auto"), ("fp16", "auto"),
                                 ("fp16", "loop")):
        row = one(args.device, precision, vectorize, args.iterations)
        rows.append(row)
        clean = row.get("violations") or row.get("error") or "clean"
        print(f"device check {precision} {vectorize}: {clean} ({row['wall_s']:.1f} s)", flush=True)
    (args.out / "device_check.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
