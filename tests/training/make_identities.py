"""Write the checkpoint identities of every supervised config in configs/ and a few extra config
tables as JSON: run against innerloop 0.1.0 it made ``identities_0_1_0.json`` (see test_legacy.py).

    PYTHONPATH=<checkout of 1d7e620> python tests/training/make_identities.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from innerloop.training.config import config_from_dict, load_config
from innerloop.training.run import identity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXTRA: dict[str, dict[str, Any]] = {
    "reptile_adam": {"algorithm": {"name": "reptile", "inner_steps": 5, "inner_optimizer": "adam",
                                   "inner_betas": [0.0, 0.99]}},
    "maml_wd": {"algorithm": {"name": "maml", "inner_weight_decay": 0.1, "weight_decay_mode": "scalar",
                              "adapt": ["head.*"]}},
    "metasgd": {"algorithm": {"name": "metasgd", "inner_lr": 0.05}},
    "fomaml_vmap": {"algorithm": {"name": "fomaml", "vectorize": "vmap"}},
    "imaml": {"algorithm": {"name": "imaml", "inner_steps": 3, "reg_lambda": 1.0, "cg_steps": 3},
              "train": {"lr_schedule": "cosine"}},
    # no inner_steps: a config's default is 1 for every algorithm, as in 0.1.0
    "reptile_defaults": {"algorithm": {"name": "reptile"}},
    "imaml_defaults": {"algorithm": {"name": "imaml"}},
    "mamlpp_defaults": {"algorithm": {"name": "mamlpp"}},
}


def main(out: str) -> None:
    cases: dict[str, Any] = {}
    for path in sorted(CONFIGS.glob("*.toml")):
        if path.name.startswith("rl_"):
            continue
        cfg = load_config(path)
        cases[path.name] = {"file": path.name, "identity": identity(cfg, cfg.algorithm.name)}
    for name, table in EXTRA.items():
        cfg = config_from_dict(table)
        cases[name] = {"config": table, "identity": identity(cfg, cfg.algorithm.name)}
    Path(out).write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
