"""Decoder families (GPT-2, Llama, Qwen2/3, Mistral, Gemma) against Hugging Face's own forward.

For each: the pooled per-layer outputs equal the base model's ``output_hidden_states`` at the last real
token (after the final norm), for a right- and a left-padded batch longer than any sliding window, and
equal each row run alone; rows leaving between layers keep their results; the reused checkpoint
classifier computes the ``*ForSequenceClassification`` logits; tokenizers without a pad token.
"""

import logging

import pytest
import torch
from tiny_models import DECODER_ARCHS, TINY_CONFIGS, write_sentiment_csv

from jeidnn.cli.main import train_main
from jeidnn.config.schema import ModelConfig
from jeidnn.errors import JeidnnError
from jeidnn.model.backbone import Backbone
from jeidnn.model.checkpoint_head import checkpoint_classifier
from jeidnn.model.heads import ExitHead
from jeidnn.model.preprocess import build_preprocessor, build_word_tokenizer, load_saved_tokenizer

LENGTHS = [12, 7, 9]  # every row longer than the tiny configs' 4-token sliding windows


def padded_batch(side: str) -> tuple[dict, list[torch.Tensor]]:
    """Three rows of different lengths padded with id 0 on `side`, and the rows unpadded."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 99, (n,), generator=g) for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols], mask[i, cols] = row, 1
    return {"input_ids": ids, "attention_mask": mask}, rows


def last_real(mask: torch.Tensor) -> torch.Tensor:
    return (torch.arange(mask.shape[1]) * mask).argmax(dim=1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_pooled_layers_equal_hf_hidden_states_and_rows_alone(arch, side):
    backbone = Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch])).eval()
    assert backbone.pooling == "last" and backbone.exit_norm and backbone.family.decoder
    inputs, rows = padded_batch(side)
    with torch.no_grad():
        pooled = backbone(inputs)  # (B, L, H)
        out = backbone.model(**inputs, output_hidden_states=True)
        token = last_real(inputs["attention_mask"])
        for layer in range(1, backbone.num_layers + 1):
            state = out.hidden_states[layer][torch.arange(len(rows)), token]
            if layer < backbone.num_layers:  # HF's last entry already carries the final norm
                state = backbone.final_norm(state)
            torch.testing.assert_close(pooled[:, layer - 1], state, atol=1e-5, rtol=1e-5)
        if side == "left" and arch == "gpt2":
            return  # learned absolute positions: left padding shifts them, in HF's own forward too
        for i, row in enumerate(rows):
            alone = backbone({"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]})
            torch.testing.assert_close(alone[0], pooled[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_rows_leaving_between_layers_keep_their_results(arch):
    backbone = Backbone.load(ModelConfig(random_config=TINY_CONFIGS[arch])).eval()
    inputs, _ = padded_batch("left")
    keep = torch.tensor([2, 0])
    with torch.no_grad():
        pooled = backbone(inputs)
        hidden, state = backbone.embed(inputs)
        hidden = backbone.run_layer(0, hidden, state)
        state, hidden = state.select(keep), hidden[keep]
        for i in range(1, backbone.num_layers):
            hidden = backbone.run_layer(i, hidden, state)
        torch.testing.assert_close(backbone.pool(hidden, state), pooled[keep, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_checkpoint_classifier_equals_hf_sequence_classification(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=3, **kwargs)
    hf = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        hf.score.weight.normal_()  # distinct rows: a class order mix-up would show
    hf.save_pretrained(tmp_path)
    found = checkpoint_classifier(ModelConfig(name_or_path=str(tmp_path)), ["a", "b", "c"], "last")
    assert found.state is not None, found.reason
    backbone = Backbone.load(ModelConfig(name_or_path=str(tmp_path))).eval()
    head = ExitHead(backbone.hidden_size, 3, backbone.family.head_activation, backbone.classifier_dropout)
    head.load_state_dict(found.state)
    head.eval()
    for side in ("right", "left"):
        inputs, _ = padded_batch(side)
        with torch.no_grad():
            expected = hf(**inputs).logits
            logits = head(backbone(inputs, layers=[backbone.num_layers])[:, 0])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def save_decoder(folder, **special):
    """A tiny Llama checkpoint whose tokenizer has only the special tokens in `special` (no pad token)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    words = ["[UNK]", "</s>"] + "the a day road good bad okay fine".split()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special).save_pretrained(folder)
    kwargs = {**TINY_CONFIGS["llama"], "pad_token_id": None, "eos_token_id": 1}
    AutoModel.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)).save_pretrained(folder)
    return folder


def test_tokenizer_without_pad_pads_with_eos(tmp_path, caplog):
    folder = save_decoder(tmp_path / "model", eos_token="</s>")
    cfg = ModelConfig(name_or_path=str(folder))
    backbone = Backbone.load(cfg).eval()
    with caplog.at_level(logging.INFO, logger="jeidnn"):
        tokenizer = build_preprocessor(cfg, backbone)
    lines = [r.getMessage() for r in caplog.records if "pad token" in r.getMessage()]
    assert lines == [f"the tokenizer of {folder} has no pad token: padding with its eos token '</s>'"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    batch = tokenizer(["the day", "a good road day"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -2:].tolist() == [1, 1] and batch["attention_mask"][0].tolist() == [
        1,
        1,
        0,
        0,
    ]
    tokenizer.save_pretrained(tmp_path / "saved")  # what the model folder carries
    assert load_saved_tokenizer(tmp_path / "saved").pad_token == "</s>"


def test_tokenizer_without_pad_or_eos_is_refused_before_any_run_folder(tmp_path, capsys):
    folder = save_decoder(tmp_path / "model")
    with pytest.raises(JeidnnError, match="neither a pad nor an eos token; set a pad token"):
        build_preprocessor(
            ModelConfig(name_or_path=str(folder)), Backbone.load(ModelConfig(name_or_path=str(folder)))
        )
    csv = write_sentiment_csv(tmp_path / "data.csv", n=60)
    argv = [
        "--config",
        "configs/smoke.yaml",
        "--model.random_config",
        "null",
        "--model.name_or_path",
        str(folder),
    ]
    argv += ["--data.source", "csv"]
    argv += ["--data.path", str(csv), "--output_dir", str(tmp_path / "runs"), "--name", "t", "--no-progress"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error:") and str(folder) in err[-1]
    assert not (tmp_path / "runs").exists()


def test_saved_word_tokenizer_loads_as_itself_next_to_a_qwen2_config(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    kwargs = dict(TINY_CONFIGS["qwen2"])
    AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).save_pretrained(tmp_path)
    words = build_word_tokenizer(["the road was awful today", "a lovely day"], 99)
    words.save_pretrained(tmp_path)
    text = "the lovely road"
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "Qwen2Tokenizer"  # why it is needed
    assert load_saved_tokenizer(tmp_path)(text)["input_ids"] == words(text)["input_ids"]
