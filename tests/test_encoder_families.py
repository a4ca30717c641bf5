"""DeBERTa-v2 and ModernBERT adapters against the Hugging Face models' own forward.

Padded batches whose rows are longer than ModernBERT's local window, the per-layer pooled outputs equal
to the HF base model's ``output_hidden_states`` pooled the same way, rows that keep running after others
left equal to those rows run alone, DeBERTa's conv after layer 1, and where each family's pooling and
classifier come from.
"""

import pytest
import torch
from tiny_models import TINY_CONFIGS

from jeidnn.config.schema import ModelConfig
from jeidnn.model.backbone import Backbone

ARCHS = ["deberta-v2", "modernbert", "xlm-roberta", "camembert"]
LENGTHS = [20, 5, 13, 11]  # all but one longer than ModernBERT's local window (8 tokens)


def tiny(arch: str, **config) -> Backbone:
    """A tiny random ``arch`` whose matrices are drawn large enough (std 0.3, not the initialiser's 0.02)
    for sharp attention: then a wrong mask or position embedding changes the outputs well past float noise."""
    torch.manual_seed(0)
    pooling = config.pop("pooling", "auto")
    backbone = Backbone.load(ModelConfig(random_config={**TINY_CONFIGS[arch], **config}, pooling=pooling))
    with torch.no_grad():
        for weight in backbone.model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.3)
    return backbone.eval()


def padded_batch(backbone: Backbone) -> dict:
    """Rows of LENGTHS real tokens padded (id 0) to the longest; token types where the family reads them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, n:] = 0
        ids[row, n:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in backbone.input_names:
        types = torch.zeros_like(ids)
        types[:, 4:] = 1  # a second segment
        inputs["token_type_ids"] = types * mask
    return inputs


def hf_pooled(backbone: Backbone, inputs: dict, pooling: str) -> torch.Tensor:
    """(B, L, H): the HF base model's own hidden states after each layer, pooled as the exits pool them."""
    out = backbone.model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].float().unsqueeze(-1)  # (B, T, 1)
    pooled = []
    for layer in range(1, backbone.num_layers + 1):
        hidden = out.hidden_states[layer]  # (B, T, H)
        if backbone.exit_norm:  # the last layer's is the model's output, already normalised
            last = layer == backbone.num_layers
            hidden = out.last_hidden_state if last else backbone.final_norm(hidden)
        pooled.append(hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1))
    return torch.stack(pooled, dim=1)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_layers_equal_the_hf_models_hidden_states(arch, pooling):
    backbone = tiny(arch, pooling=pooling)
    assert backbone.pooling == pooling
    inputs = padded_batch(backbone)
    with torch.no_grad():
        ours = backbone(inputs)
        theirs = hf_pooled(backbone, inputs, pooling)
    assert ours.shape == (len(LENGTHS), 3, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_still_running_equal_those_rows_alone(arch):
    """Rows 2 and 0 go on after layer 1 (the others exit): what they get equals running them alone."""
    backbone = tiny(arch)
    inputs = padded_batch(backbone)
    keep = torch.tensor([2, 0])
    with torch.no_grad():
        hidden, state = backbone.embed(inputs)
        hidden = backbone.run_layer(0, hidden, state)
        hidden, state = hidden.index_select(0, keep), state.select(keep)
        assert state.batch == 2 and all(
            v.shape[0] == 2 for v in state.rows.values() if isinstance(v, torch.Tensor)
        )
        pooled = []
        for i in (1, 2):
            hidden = backbone.run_layer(i, hidden, state)
            pooled.append(backbone.pool(hidden, state))
        for position, row in enumerate(keep.tolist()):
            n = LENGTHS[row]
            alone = backbone({k: v[row : row + 1, :n] for k, v in inputs.items()})  # no padding at all
            torch.testing.assert_close(torch.stack(pooled, 1)[position], alone[0, 1:], atol=1e-5, rtol=1e-5)


def test_deberta_runs_its_conv_after_the_first_layer():
    backbone = tiny("deberta-v2")
    conv = backbone.model.encoder.conv
    assert conv is not None and backbone.model.config.position_biased_input is False
    inputs = padded_batch(backbone)
    with torch.no_grad():
        hidden, state = backbone.embed(inputs)
        assert state.shared["relative_pos"] is not None and state.shared["rel_embeddings"] is not None
        ours = backbone.run_layer(0, hidden, state)
        theirs = backbone.model(**inputs, output_hidden_states=True).hidden_states[1]
        without_conv = backbone.layers[0](hidden, state.rows["mask"], **state.shared)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (without_conv - theirs).abs().max() > 1e-2  # the conv changes layer 1's output: it ran


def test_modernbert_alternates_global_and_sliding_window_attention():
    backbone = tiny("modernbert")
    config = backbone.model.config
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    inputs = padded_batch(backbone)
    with torch.no_grad():
        hidden, state = backbone.embed(inputs)
        windowed = backbone.run_layer(1, hidden, state)
        state.rows["sliding_attention"] = state.rows["full_attention"]  # as if every layer were global
        everywhere = backbone.run_layer(1, hidden, state)
    # The sliding window hides tokens of the long rows only: it matters at these lengths.
    assert 2 * config.sliding_window < max(LENGTHS)
    assert (windowed[0] - everywhere[0]).abs().max() > 1e-3
    torch.testing.assert_close(windowed[1, :5], everywhere[1, :5])  # 5 tokens fit in every window


def test_modernbert_pools_as_its_checkpoint_says(tmp_path):
    from jeidnn.model.heads import ExitHead
    from jeidnn.train.checkpoints import save_backbone

    assert tiny("modernbert").pooling == "cls"
    mean = {**TINY_CONFIGS["modernbert"], "classifier_pooling": "mean"}
    assert Backbone.load(ModelConfig(random_config=mean)).pooling == "mean"  # pooling: auto
    backbone = Backbone.load(ModelConfig(random_config=mean, pooling="cls"))
    assert backbone.pooling == "cls" and backbone.exit_norm
    # A run pooling otherwise than the checkpoint records it saves a pooling config that says so.
    save_backbone(backbone, ExitHead(32, 3, "gelu"), None, tmp_path)
    assert Backbone.load(ModelConfig(name_or_path=str(tmp_path / "backbone"))).pooling == "cls"
    backbone.model.save_pretrained(tmp_path / "plain")
    assert Backbone.load(ModelConfig(name_or_path=str(tmp_path / "plain"))).pooling == "mean"


def test_classifier_heads_as_hugging_face_builds_them(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from jeidnn.model.checkpoint_head import checkpoint_classifier

    assert tiny("deberta-v2").classifier_dropout == 0.1  # hidden_dropout_prob without cls_dropout
    assert tiny("deberta-v2", cls_dropout=0.3).classifier_dropout == 0.3
    assert tiny("modernbert", classifier_dropout=0.2).classifier_dropout == 0.2
    kwargs = dict(TINY_CONFIGS["modernbert"])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "m")
    found = checkpoint_classifier(ModelConfig(name_or_path=str(tmp_path / "m")), ["a", "b", "c"], "cls")
    assert found.state is None and "ModernBertForSequenceClassification does not map" in found.reason
