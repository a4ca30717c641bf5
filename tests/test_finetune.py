"""Stage 0's pieces: global batches split across processes, the step-based learning rate, the device, and
where the final classifier comes from when stage 0 does not run."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import jeidnn.train.devices as devices
from jeidnn.config.schema import FinetuneConfig, ModelConfig, RunConfig, WarmupConfig
from jeidnn.errors import JeidnnError
from jeidnn.model.heads import ExitHeads
from jeidnn.train.devices import GlobalBatches, ShardedBatches, check_logger, run_device
from jeidnn.train.features import FeatureSplit
from jeidnn.train.finetune import final_head_without_finetune
from jeidnn.train.modules import FinetuneModule, WarmupModule, feature_loader

ROOT = Path(__file__).resolve().parent.parent


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(devices, "rank_and_world", lambda: (rank, world))


def test_global_batches_split_across_processes_are_the_single_process_batches(monkeypatch):
    sampler = GlobalBatches(num_samples=21, batch_size=4, seed=3)
    single = list(sampler)
    assert len(single) == 6 and sorted(i for b in single for i in b) == list(range(21))
    assert [len(b) for b in single] == [4, 4, 4, 4, 4, 1]
    shares = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        shares.append(list(sampler))
        assert len(sampler) == 5  # the last batch (1 row) has no row for the second process: dropped
    for b, (mine, theirs) in enumerate(zip(*shares)):
        assert sorted(mine + theirs) == sorted(single[b]) and len(mine) == len(theirs) == 2
        assert sampler.global_size(b) == 4
    assert sampler.global_size(5) == 1


def test_global_batches_replay_an_epoch_and_resume_inside_it(monkeypatch):
    sampler = GlobalBatches(num_samples=10, batch_size=3, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0  # a new order each epoch
    # The first epoch's order is the one a shuffling DataLoader seeded like the run drew before.
    assert [i for b in epoch0 for i in b] == torch.randperm(
        10, generator=torch.Generator().manual_seed(0)
    ).tolist()
    sampler.resume_at(1, 2)
    assert list(sampler) == epoch1[2:]  # a checkpoint after 2 batches of epoch 1
    assert list(sampler) == epoch1  # only once
    sampler.resume_at(1, 2)
    sampler.set_epoch(2)
    assert len(list(sampler)) == 4  # a position in another epoch does not apply


def test_sharded_batches_cover_every_sample_once(monkeypatch):
    batches = [[0, 1], [2, 3], [4, 5], [6]]
    seen = []
    for rank in range(3):
        as_rank(monkeypatch, rank, 3)
        seen += list(ShardedBatches(batches))
    assert sorted(seen) == batches


def test_sharded_batches_of_a_split_smaller_than_the_processes(monkeypatch):
    seen = []
    for rank in range(3):
        as_rank(monkeypatch, rank, 3)
        (mine,) = list(ShardedBatches([[0, 1, 2, 3], [4]]))  # 2 batches, 3 processes: one batch each
        seen += mine
    assert sorted(seen) == [0, 1, 2, 3, 4]
    with pytest.raises(JeidnnError, match="a split of 2 samples cannot be shared by 3 processes"):
        list(ShardedBatches([[0, 1]]))


def test_learning_rate_follows_the_optimizer_step():
    cfg = FinetuneConfig(lr=1.0, warmup_fraction=0.2)
    module = FinetuneModule(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), cfg, 10, 2, GlobalBatches(10, 1, 0))
    assert [module.lr_factor(s) for s in range(11)] == [
        0.5,
        1.0,
        1.0,
        7 / 8,
        6 / 8,
        5 / 8,
        4 / 8,
        3 / 8,
        2 / 8,
        1 / 8,
        0,
    ]


def test_accelerator_names_resolve_to_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device("auto") == run_device("cpu") == torch.device("cpu")
    with pytest.raises(JeidnnError, match="accelerator gpu asks for a GPU but torch sees none"):
        run_device("gpu")
    with pytest.raises(JeidnnError, match="--device cuda:0 asks for a GPU"):
        run_device("cuda:0", key="--device")  # one resolver for train.py's accelerator and --device
    with pytest.raises(JeidnnError, match="accelerator 'tpu'"):
        run_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run_device("auto") == run_device("gpu") == run_device("cuda") == torch.device("cuda")
    assert run_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(JeidnnError, match="cuda:1: torch sees 1 GPU"):
        run_device("cuda:1")


def test_tensorboard_without_its_package_is_refused_before_any_work(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    check_logger(RunConfig(logger="csv"))
    with pytest.raises(JeidnnError, match="pip install tensorboard"):
        check_logger(RunConfig(logger="tensorboard"))


def without_stage0(
    model: ModelConfig, labels: list[str], max_epochs: int = 5
) -> tuple[dict, bool, ExitHeads]:
    """final_head_without_finetune on fresh heads: (its `finetune` entry, train_final_head, the heads)."""
    cfg = RunConfig(
        model=model, finetune=FinetuneConfig(enabled=False), warmup=WarmupConfig(max_epochs=max_epochs)
    )
    heads = ExitHeads([1, 2], 32, len(labels), "tanh")
    result = final_head_without_finetune(cfg, labels, "cls", heads.final)
    return result.finetune, result.train_final_head, heads


def test_without_stage0_the_final_head_is_the_checkpoints_or_trains_with_the_ims(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    model = BertForSequenceClassification(BertConfig(**tiny, vocab_size=99, id2label={0: "no", 1: "yes"}))
    model.save_pretrained(tmp_path / "clf")
    entry, train_final, heads = without_stage0(ModelConfig(name_or_path=str(tmp_path / "clf")), ["no", "yes"])
    assert (
        not train_final
        and "trained classifier" in entry["final_head"]
        and entry["skipped"] == "finetune.enabled is false"
    )
    assert torch.equal(heads.final.net[3].weight, model.classifier.weight)
    assert torch.equal(heads.final.net[0].weight, model.bert.pooler.dense.weight)

    random = ModelConfig(random_config={"model_type": "bert", **tiny})
    entry, train_final, _ = without_stage0(random, ["no", "yes"])
    assert train_final and "trained with the IMs in stage 1" in entry["final_head"]
    with pytest.raises(JeidnnError, match="final classifier would stay untrained .* warmup.max_epochs 0"):
        without_stage0(random, ["no", "yes"], max_epochs=0)


def test_warmup_can_train_the_final_head_too():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (240,), generator=gen)
    features = torch.randn(240, 2, 8, generator=gen)
    features[torch.arange(240), :, labels] += 2.0  # every exit can tell the classes apart
    train, val = FeatureSplit(features[:160], labels[:160]), FeatureSplit(features[160:], labels[160:])
    heads = ExitHeads([1, 2], 8, 3, "tanh", dropout=0.0)
    start = [p.clone() for p in heads.final.parameters()]
    module = WarmupModule(heads, val, WarmupConfig(max_epochs=8, patience=8, lr=0.05), train_final=True)
    assert module.trained == [0, 1]
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, feature_loader(train, 32, True, 0))
    module.restore_best()
    assert module.best_acc[1] > 0.7 and module.val_accuracy()[1] == module.best_acc[1]
    assert any(not torch.equal(a, b) for a, b in zip(start, heads.final.parameters()))
    assert [p.requires_grad for p in heads.final.parameters()] == [False] * 4  # frozen again for stage 2
    assert all(p.requires_grad for p in heads.heads[0].parameters())


def test_warmup_trains_each_im_as_if_alone():
    """The IMs share no parameters, so training them together equals training each alone (which is why
    per-exit loss weights would change nothing under Adam, and none are applied)."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (96,), generator=gen)
    features = torch.randn(96, 3, 8, generator=gen)
    train, val = FeatureSplit(features[:64], labels[:64]), FeatureSplit(features[64:], labels[64:])

    def fit(heads: ExitHeads, only: int | None) -> None:
        module = WarmupModule(heads, val, WarmupConfig(max_epochs=2, patience=5, lr=0.05))
        if only is not None:  # train a single IM: the others stay out of the loss
            module.active = [j == only for j in range(len(module.active))]
        trainer = pl.Trainer(
            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        trainer.fit(module, feature_loader(train, 16, True, 0))

    torch.manual_seed(0)
    together = ExitHeads([1, 2, 3], 8, 3, "tanh", dropout=0.0)
    alone = copy.deepcopy(together)
    fit(together, None)
    fit(alone, 1)
    for a, b in zip(together.heads[1].parameters(), alone.heads[1].parameters()):
        torch.testing.assert_close(a, b)
    assert any(
        not torch.equal(a, b) for a, b in zip(together.heads[0].parameters(), alone.heads[0].parameters())
    )


def test_a_run_without_stage0_says_where_its_final_head_comes_from(tmp_path):
    from jeidnn.cli.main import train_main

    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(tmp_path), "--no-progress"]
    assert train_main([*args, "--finetune.enabled", "false", "--jeidnn.enabled", "false"]) == 0
    report = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert report["finetune"]["skipped"] == "finetune.enabled is false"
    assert "trained with the IMs in stage 1" in report["finetune"]["final_head"]
    run = tmp_path / "smoke"
    assert (run / "backbone" / "model.safetensors").is_file()
    from safetensors.torch import load_file

    as_loaded = load_file(str(run / "checkpoints" / "final_head.safetensors"))
    warm = load_file(str(run / "checkpoints" / "warmup_heads.safetensors"))
    assert any(not torch.equal(v, warm[f"heads.2.{k}"]) for k, v in as_loaded.items())  # stage 1 trained it


def test_backbone_folder_loads_as_the_run_pools_and_resumes_exactly(tmp_path):
    """`runs/<name>/backbone/` (what the export reads) is a Hugging Face folder that `Backbone.load` pools
    like the run, and a resumed run loads it back bit for bit."""
    from jeidnn.model.backbone import Backbone
    from jeidnn.model.preprocess import build_word_tokenizer
    from jeidnn.train.checkpoints import restore_saved_backbone, save_backbone

    def parts(seed: int) -> SimpleNamespace:
        torch.manual_seed(seed)
        random = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
        backbone = Backbone.load(
            ModelConfig(random_config={**random, "intermediate_size": 37}, pooling="mean")
        )
        heads = ExitHeads([1, 2], 32, 3, "tanh")
        tokenizer = build_word_tokenizer(["a great day", "a bad day"], 30522)
        return SimpleNamespace(backbone=backbone.eval(), heads=heads, preprocessor=tokenizer)

    run, other = parts(0), parts(1)
    save_backbone(run.backbone, run.heads.final, run.preprocessor, tmp_path)
    again = Backbone.load(ModelConfig(name_or_path=str(tmp_path / "backbone"))).eval()
    assert again.pooling == "mean"
    ids = torch.tensor([[2, 7, 8, 3, 0]])
    inputs = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    with torch.no_grad():
        torch.testing.assert_close(again(inputs), run.backbone(inputs), rtol=0, atol=0)
    import jeidnn.pipeline.run

    assert not hasattr(jeidnn.pipeline.run, "load_backbone")  # one `load_backbone` only: the export's
    # A resumed run: same weights in its freshly built backbone and head.
    restore_saved_backbone(other.backbone, other.heads.final, tmp_path)
    for module in ("backbone", "heads"):
        mine, theirs = getattr(run, module).state_dict(), getattr(other, module).state_dict()
        final = [k for k in mine if module == "backbone" or k.startswith("heads.1.")]
        assert all(torch.equal(mine[k], theirs[k]) for k in final)


def test_warmup_keeps_jointly_trained_ims_unless_an_epoch_beats_them():
    """Regimes joint / mixed: the IMs arrive trained. With keep_start their val accuracy is the bar, so IMs
    already right on every val sample keep their weights (best epoch -1); without it the warm-up's best epoch
    replaces them."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (120,), generator=gen)
    features = torch.randn(120, 3, 8, generator=gen) * 0.1
    features[torch.arange(120), :, labels] += 3.0  # class c lights up dimension c at every exit
    train, val = FeatureSplit(features[:80], labels[:80]), FeatureSplit(features[80:], labels[80:])

    def perfect_heads() -> ExitHeads:
        torch.manual_seed(0)  # the same final head each time
        heads = ExitHeads([1, 2, 3], 8, 3, "tanh", dropout=0.0, im_head="linear")
        with torch.no_grad():
            for im in heads.heads[:-1]:
                im.net[-1].weight.copy_(torch.eye(3, 8) * 5)
                im.net[-1].bias.zero_()
        return heads

    def warm(keep_start: bool) -> tuple[ExitHeads, WarmupModule]:
        heads = perfect_heads()
        module = WarmupModule(
            heads, val, WarmupConfig(max_epochs=2, patience=5, lr=0.5), keep_start=keep_start
        )
        trainer = pl.Trainer(
            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        trainer.fit(module, feature_loader(train, 16, True, 0))
        module.restore_best()
        return heads, module

    start = perfect_heads().state_dict()
    kept, module = warm(keep_start=True)
    assert module.best_acc == [1.0, 1.0] and module.best_epoch == [-1, -1]
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in start.items())
    replaced, module = warm(keep_start=False)
    assert module.best_epoch[0] >= 0
    assert any(
        not torch.equal(replaced.state_dict()[k], v) for k, v in start.items() if k.startswith("heads.0.")
    )
