"""Tiny random configurations of every supported architecture (no downloads), and shared test helpers."""

from pathlib import Path

TEXT_COMMON = {"vocab_size": 99, "max_position_embeddings": 64}

TINY_CONFIGS: dict[str, dict] = {
    "bert": {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        **TEXT_COMMON,
    },
    "roberta": {
        "model_type": "roberta",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "pad_token_id": 1,
        **TEXT_COMMON,
    },
    "electra": {
        "model_type": "electra",
        "hidden_size": 32,
        "embedding_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        **TEXT_COMMON,
    },
    "distilbert": {
        "model_type": "distilbert",
        "dim": 32,
        "n_layers": 3,
        "n_heads": 2,
        "hidden_dim": 37,
        **TEXT_COMMON,
    },
    "vit": {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 3,
    },
}
TINY_CONFIGS["deit"] = {**TINY_CONFIGS["vit"], "model_type": "deit"}
TINY_CONFIGS["xlm-roberta"] = {**TINY_CONFIGS["roberta"], "model_type": "xlm-roberta"}
TINY_CONFIGS["camembert"] = {**TINY_CONFIGS["roberta"], "model_type": "camembert"}
TINY_CONFIGS["deberta-v2"] = {  # DeBERTa-v3-like: relative attention only, log buckets, conv after layer 1
    "model_type": "deberta-v2",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "type_vocab_size": 2,
    "relative_attention": True,
    "position_biased_input": False,
    "pos_att_type": "p2c|c2p",
    "position_buckets": 8,
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
    "conv_kernel_size": 3,
    "conv_act": "gelu",
    **TEXT_COMMON,
}
TINY_CONFIGS["modernbert"] = {  # layers: global, sliding window, global; a window shorter than the texts
    "model_type": "modernbert",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "global_attn_every_n_layers": 2,
    "local_attention": 8,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "cls_token_id": 2,
    "eos_token_id": 3,
    "sep_token_id": 3,
    **TEXT_COMMON,
}
TEXT_ARCHS = [
    "bert",
    "roberta",
    "electra",
    "distilbert",
    "xlm-roberta",
    "camembert",
    "deberta-v2",
    "modernbert",
]
VISION_ARCHS = ["vit", "deit"]

# Decoders: pad = [PAD] (id 0) and eos = [SEP] (id 3) of the word tokenizer random backbones get.
DECODER_TOKENS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
LLAMA_LIKE = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    **DECODER_TOKENS,
    **TEXT_COMMON,
}
TINY_CONFIGS["gpt2"] = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 3,
    "n_head": 4,
    "n_inner": 37,
    "n_positions": 64,
    "vocab_size": 99,
    **DECODER_TOKENS,
}
TINY_CONFIGS["llama"] = {"model_type": "llama", **LLAMA_LIKE}
# Sliding windows (4 tokens) shorter than the test texts; Qwen's layer_types mix both kinds of attention.
SLIDING = {"use_sliding_window": True, "sliding_window": 4}
FULL, LOCAL = "full_attention", "sliding_attention"
TINY_CONFIGS["qwen2"] = {"model_type": "qwen2", **LLAMA_LIKE, **SLIDING, "layer_types": [FULL, FULL, LOCAL]}
TINY_CONFIGS["qwen3"] = {
    "model_type": "qwen3",
    **LLAMA_LIKE,
    "head_dim": 8,
    **SLIDING,
    "layer_types": [LOCAL, FULL, LOCAL],
}
TINY_CONFIGS["mistral"] = {"model_type": "mistral", **LLAMA_LIKE, "sliding_window": 4}
TINY_CONFIGS["gemma"] = {"model_type": "gemma", **LLAMA_LIKE, "head_dim": 8}
DECODER_ARCHS = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma"]
TEXT_ARCHS += DECODER_ARCHS


def write_sentiment_csv(path, n: int = 400, seed: int = 0):
    """A learnable 3-class text corpus: the class shows in a cue word, at a random place among fillers."""
    import random

    rng = random.Random(seed)
    cues = {
        "negative": ["bad", "awful", "terrible"],
        "neutral": ["okay", "fine", "average"],
        "positive": ["good", "great", "lovely"],
    }
    fillers = "the a day car road drive phone today it was this my very really".split()
    lines = ["text,label"]
    for _ in range(n):
        label = rng.choice(sorted(cues))
        words = rng.choices(fillers, k=rng.randint(3, 12))
        if rng.random() < 0.85:  # some samples carry no cue: the hard ones
            words.insert(rng.randint(0, len(words)), rng.choice(cues[label]))
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run_overrides(csv_path, out_dir, name="t"):
    """CLI overrides that point configs/smoke.yaml at a generated CSV in a temp folder."""
    return [
        "--data.source",
        "csv",
        "--data.path",
        str(csv_path),
        "--output_dir",
        str(out_dir),
        "--name",
        name,
    ]


FEW_STEPS = {
    "finetune": {"epochs": 1, "batch_size": 32, "val_check_interval": 2, "patience": 1},
    "warmup": {"max_epochs": 2},
    "jeidnn": {"lambdas": [0.5], "epochs": 1, "alternate_steps": 2},
    "data": {"max_train_samples": 96, "max_eval_samples": 64, "eval_batch_size": 64},
}
"""configs/smoke.yaml cut to a few steps: the whole-run tests of every family and of half precision."""


def few_steps_argv(model: list[str], data: list[str], out_dir, name: str, *extra: str) -> list[str]:
    """``python train.py`` arguments: configs/smoke.yaml with ``FEW_STEPS``, 24-token inputs, the ``model``
    and ``data`` overrides, written to ``out_dir/name``."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    argv = [
        "--config",
        str(root / "configs" / "smoke.yaml"),
        *model,
        "--model.max_length",
        "24",
        *data,
        "--output_dir",
        str(out_dir),
        "--name",
        name,
        "--no-progress",
        *extra,
    ]
    for section, values in FEW_STEPS.items():
        for key, value in values.items():
            argv += [f"--{section}.{key}", yaml.safe_dump(value, default_flow_style=True).strip()]
    return argv


def kill_at(point: str, command: list[str], log: Path) -> None:
    """Run `command` (in the repository root) until it logs that it paused at `point`, then SIGKILL it."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "JEIDNN_PAUSE_AT": point, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    try:
        while f"paused at {point}" not in log.read_text():
            assert proc.poll() is None, f"the run ended before {point}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no pause at {point}"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def check_exported_exits_on_test(run_dir: Path) -> None:
    """The run's exported model, fed the test inputs, leaves where report.json's `export` entry says its
    operating point leaves, with its accuracy (up to one sample: a fitted threshold equals one calib sample's
    confidence, which float noise may put on either side)."""
    import json

    import pytest

    from jeidnn import EarlyExitModel
    from jeidnn.config.parser import load_config
    from jeidnn.data.sources import load_raw
    from jeidnn.data.splits import make_splits

    report = json.loads((run_dir / "report.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    raw = load_raw(cfg.data, "text")
    test = make_splits(len(raw.labels), cfg.data, cfg.seed).indices["test"]
    model = EarlyExitModel.from_pretrained(run_dir / "model")
    predictions = model.predict([raw.inputs[i] for i in test], alpha=None)
    layers = [p.exit_layer for p in predictions]
    fractions = [layers.count(layer) / len(layers) for layer in model.heads.layers]
    assert fractions == pytest.approx(report["export"]["test_exit_fractions"], abs=1.5 / len(layers))
    accuracy = sum(p.label == raw.label_names[raw.labels[i]] for p, i in zip(predictions, test)) / len(test)
    assert accuracy == pytest.approx(report["export"]["test_accuracy"], abs=1.5 / len(layers))
