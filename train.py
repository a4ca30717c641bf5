"""Train, evaluate and export a JEI-DNN early-exit model.

    python train.py                                   # configs/default.yaml (runs offline)
    python train.py --config configs/smoke.yaml       # tiny random model, under a minute
    python train.py --config configs/default.yaml --data.max_train_samples 2000 --name quick

The recipe (config -> data -> model -> stages 0-2 -> evaluate -> report -> export) lives in
`jeidnn.pipeline.run`; see README.md for what each stage does and what lands in runs/<name>/.
"""

import sys

from jeidnn.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
