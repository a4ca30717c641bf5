"""Train, evaluate and export a JEI-DNN early-exit model.

    python train.py                                   # configs/default.yaml (runs offline)
    python train.py --config configs/smoke.yaml       # tiny random model, under a minute
    python train.py --config configs/default.yaml --data.max_train_samples 2000 --name quick
    python train.py --help                            # every config key with its documentation
    python train.py --config configs/smoke.yaml --print_config   # the resolved config, nothing run
    python train.py --quiet                           # no progress bars, only warnings and errors

The recipe (config -> data -> model -> stages 0-2 -> evaluate -> report -> export) lives in
`jeidnn.pipeline.run.run`; see README.md for what each stage does and what lands in runs/<name>/.
"""

import sys

from jeidnn.cli.main import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
