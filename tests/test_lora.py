"""ecellm.lora on plain user modules: the layer, inject, merge, parameter counts, PEFT-format adapter files.
Parity with transformers + peft on real model families lives in tests/test_lora_parity.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ecellm import lora
from ecellm.errors import EcellmError
from ecellm.models import CheckpointError


class MLP(nn.Module):
    def __init__(self, d: int = 8, h: int = 16, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d, h, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TinyLM(nn.Module):
    """Embedding, two blocks of MLPs, and an LM head tied to the embedding."""

    def __init__(self, vocab: int = 11, d: int = 8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([MLP(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Non-zero lora_B everywhere, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_inject_user_mlp_only_fc1():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(3, 5, 8)
    before = mlp(x)
    lora.inject(mlp, r=4, alpha=8, targets=["fc1"])
    assert isinstance(mlp.fc1, lora.LoRALinear) and type(mlp.fc2) is nn.Linear
    assert mlp.fc1.lora_A.shape == (4, 8) and mlp.fc1.lora_B.shape == (16, 4)
    assert mlp.fc1.scaling == 2.0
    torch.testing.assert_close(mlp(x), before, rtol=0, atol=0)  # B = 0: exactly the base model
    assert [n for n, p in mlp.named_parameters() if p.requires_grad] == ["fc1.lora_A", "fc1.lora_B"]


def test_forward_matches_formula_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    mlp = MLP()
    base_keys = set(mlp.state_dict())
    lora.inject(mlp, r=2, alpha=6, targets=["fc1"])
    randomize_lora(mlp)
    x = torch.randn(4, 8)
    fc1 = mlp.fc1
    expected = x @ fc1.weight.T + fc1.bias + 3.0 * (x @ fc1.lora_A.T @ fc1.lora_B.T)
    torch.testing.assert_close(fc1(x), expected, rtol=1e-5, atol=1e-5)
    assert set(mlp.state_dict()) == base_keys | {"fc1.lora_A", "fc1.lora_B"}


def test_rslora_scaling():
    layer = lora.inject(MLP(), r=4, alpha=8, targets=["fc2"], rslora=True).fc2
    assert layer.scaling == 8 / 2


@pytest.mark.parametrize(
    "targets, chosen",
    [
        (["fc2"], ["blocks.0.fc2", "blocks.1.fc2"]),
        (["0.fc2", "lm_head"], ["blocks.0.fc2", "lm_head"]),  # dotted suffix and exact name
        (["blocks.1.fc1"], ["blocks.1.fc1"]),
        (r"blocks\.\d\.fc1", ["blocks.0.fc1", "blocks.1.fc1"]),  # a string is a regex on the whole name
        ("fc1", []),  # ... so "fc1" alone, as a regex, matches no full name
    ],
)
def test_target_matching(targets, chosen):
    model = TinyLM()
    if not chosen:
        with pytest.raises(ValueError, match="match no nn.Linear"):
            lora.inject(model, targets=targets)
        return
    lora.inject(model, targets=targets)
    assert sorted(lora.lora_layers(model)) == chosen


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\['fc3'\].*'fc1', 'fc2'"):
        lora.inject(MLP(), targets=["fc1", "fc3"])  # a typo is not silently ignored
    with pytest.raises(lora.LoRAError, match=r"no default LoRA targets for MLP .*Linear modules: \['fc1', 'fc2'\]"):
        lora.inject(MLP())
    mlp = lora.inject(MLP(), targets=["fc1"])
    with pytest.raises(ValueError, match="already has LoRA layers.*'fc1'"):
        lora.inject(mlp, targets=["fc2"])
    with pytest.raises(ValueError, match="rank r must be positive"):
        lora.inject(MLP(), r=0, targets=["fc1"])


class Encoder(nn.Module):
    """A user's model around torch's own transformer layer."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x))


@pytest.mark.parametrize("model, targets, message", [
    (nn.TransformerEncoderLayer(16, 2, 32), ["self_attn.out_proj"],
     r"cannot wrap 'self_attn.out_proj': nn.MultiheadAttention multiplies by out_proj.weight itself"),
    (nn.MultiheadAttention(16, 2), ".*", r"cannot wrap 'out_proj': nn.MultiheadAttention .* never run"),
    (Encoder(), ["head", "out_proj"], r"cannot wrap 'layer.self_attn.out_proj'"),
    (Encoder(), ["linear1"], r"cannot wrap 'layer.linear1': nn.TransformerEncoderLayer's inference fast path"),
])
def test_inject_refuses_linears_their_owner_never_calls(model, targets, message):
    """Before, these were wrapped and their LoRA branch silently never ran (gradients None, output unchanged)."""
    with pytest.raises(lora.LoRAError, match=message):
        lora.inject(model, r=2, targets=targets)
    assert lora.lora_layers(model) == {} and all(p.requires_grad for p in model.parameters())  # left as it was


def test_the_called_linears_of_torchs_transformer_layer_train():
    """What inject still takes inside torch's transformer layer: linears its training forward calls."""
    torch.manual_seed(0)
    model = lora.inject(Encoder().train(), r=2, targets=["head"])
    model(torch.randn(2, 5, 16)).sum().backward()
    assert model.head.lora_B.grad is not None and model.head.lora_B.grad.abs().sum() > 0


def test_default_targets_use_config_model_type_and_phi_aliases():
    class Cfg:
        model_type = "phi"

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.dense = (nn.Linear(4, 4) for _ in range(4))

    class Phi(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.self_attn, self.mlp, self.lm_head = Attn(), MLP(4, 8), nn.Linear(4, 9)

    names = ["lm_head", "mlp.fc1", "mlp.fc2", "self_attn.dense", "self_attn.k_proj", "self_attn.q_proj",
             "self_attn.v_proj"]
    assert sorted(lora.lora_layers(lora.inject(Phi()))) == names
    old = lora.inject(Phi(), targets=["Wqkv", "out_proj", "fc1", "fc2", "linear"])  # the paper's Phi names
    assert sorted(lora.lora_layers(old)) == names


def test_only_lora_gets_gradients_and_optimizer_changes_only_lora():
    torch.manual_seed(0)
    model = lora.inject(TinyLM(), r=4, targets=["fc1", "fc2", "lm_head"], dropout=0.1)
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randint(0, 11, (2, 5))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != ("lora_" in key), key


def test_count_parameters_counts_tied_weights_once():
    model = TinyLM(vocab=11, d=8)
    mlp_params = 2 * (8 * 16 + 16 + 16 * 8 + 8)
    assert lora.count_parameters(model) == (11 * 8 + mlp_params, 11 * 8 + mlp_params)
    lora.inject(model, r=2, targets=["fc1", "lm_head"])
    trainable = 2 * (2 * 8 + 16 * 2) + (2 * 8 + 11 * 2)
    assert lora.count_parameters(model) == (trainable, 11 * 8 + mlp_params + trainable)


def test_dropout_only_in_training_and_skipped_at_zero():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    no_drop = lora.inject(MLP(), targets=["fc1"])
    randomize_lora(no_drop)
    no_drop.train()
    torch.testing.assert_close(no_drop(x), no_drop.eval()(x), rtol=0, atol=0)
    drop = lora.inject(MLP(), targets=["fc1"], dropout=0.5)
    randomize_lora(drop)
    drop.train()
    assert not torch.allclose(drop(x), drop(x))
    drop.eval()
    torch.testing.assert_close(drop(x), drop(x), rtol=0, atol=0)


def test_dropout_drops_the_share_p_and_keeps_the_update_unbiased():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(8, 6), r=4, alpha=4, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(1, 8).expand(40000, 8)  # one input, 40000 independent dropout masks
    base = F.linear(x[:1], layer.weight, layer.bias)
    update = layer.eval()(x[:1]) - base  # (1, 6), no dropout
    dropped = layer.train()(x) - base  # (40000, 6)
    torch.testing.assert_close(dropped.mean(0, keepdim=True), update, rtol=0, atol=0.03 * update.abs().max().item())
    with torch.no_grad():  # one input channel alone: its update is either dropped or scaled by 1 / (1 - p)
        single = torch.zeros(40000, 8)
        single[:, 3] = 1.0
        kept = (layer(single) - F.linear(single, layer.weight, layer.bias)).abs().sum(-1) > 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01


def test_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    model = lora.inject(TinyLM(), r=4, alpha=8, targets=["fc1", "fc2"])
    randomize_lora(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = torch.randint(0, 11, (2, 7))
    unmerged = model(ids)
    lora.merge(model)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.blocks[0].fc1.weight, base["blocks.0.fc1.weight"])
    lora.merge(model)  # merging twice is a no-op
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged_state[k]), k
    lora.unmerge(model)
    lora.unmerge(model)
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_tied_lm_head_keeps_tie_and_merge_leaves_embedding_alone():
    torch.manual_seed(0)
    model = lora.inject(TinyLM(), r=4, targets=["lm_head"])
    assert model.lm_head.weight is model.embed_tokens.weight  # shared, not copied
    randomize_lora(model)
    embedding = model.embed_tokens.weight.clone()
    ids = torch.randint(0, 11, (2, 7))
    unmerged = model(ids)
    lora.merge(model)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, embedding)  # the input embedding did not absorb the update
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, embedding)


def test_bf16_base_keeps_fp32_lora():
    torch.manual_seed(0)
    ref = lora.inject(MLP(), r=4, targets=["fc1", "fc2"])
    randomize_lora(ref)
    model = MLP(dtype=torch.bfloat16)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" not in k})
    lora.inject(model, r=4, targets=["fc1", "fc2"])
    model.load_state_dict(lora.lora_state_dict(ref), strict=False)
    assert model.fc1.lora_A.dtype == torch.float32 and model.fc1.weight.dtype == torch.bfloat16
    x = torch.randn(3, 8)
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.fc1.lora_A.grad.dtype == torch.float32 and model.fc1.weight.grad is None
    # Against the same LoRA weights on the fp32 base rounded to bf16: the update is computed in fp32.
    expected = ref.fc2(ref.act(ref.fc1(x)))
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    w0 = model.fc1.weight.clone()
    lora.merge(model)
    assert model.fc1.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.fc1.weight.float(), (w0.float() + model.fc1.delta_weight()).bfloat16().float())


def test_lora_state_dict_round_trip():
    torch.manual_seed(0)
    a = lora.inject(MLP(), targets=["fc1", "fc2"])
    randomize_lora(a)
    sd = lora.lora_state_dict(a)
    assert sorted(sd) == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    b = MLP()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" not in k})
    lora.inject(b, targets=["fc1", "fc2"])
    result = b.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    x = torch.randn(2, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_adapter_file_format_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = lora.inject(TinyLM(), r=4, alpha=8, dropout=0.1, targets=["fc1", "lm_head"])
    randomize_lora(model)
    lora.save_adapter(model, tmp_path, base_model_name_or_path="some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "some/base"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (4, 8, 0.1, "none")
    assert config["target_modules"] == ["fc1", "lm_head"] and config["task_type"] is None
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{m}.lora_{ab}.weight" for m in
                            ["blocks.0.fc1", "blocks.1.fc1", "lm_head"] for ab in "AB"}
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (11, 4)

    fresh = TinyLM()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    lora.load_adapter(fresh, tmp_path)
    assert fresh.blocks[0].fc1.r == 4 and fresh.blocks[0].fc1.dropout == 0.1
    model.eval(), fresh.eval()
    ids = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_target_modules_regex_when_short_names_overreach(tmp_path):
    model = lora.inject(TinyLM(), targets=["blocks.0.fc1"])
    lora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == r"blocks\.0\.fc1"
    assert sorted(lora.lora_layers(lora.load_adapter(TinyLM(), tmp_path))) == ["blocks.0.fc1"]


def _write_adapter(path, tensors, **config):
    path.mkdir()
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "lora_dropout": 0.0, "target_modules": ["fc1"]}
    (path / "adapter_config.json").write_text(json.dumps(base | config))
    save_file(tensors, str(path / "adapter_model.safetensors"))


A, B = "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"
GOOD = {A: torch.zeros(2, 8), B: torch.zeros(16, 2)}


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (GOOD | {A: torch.zeros(2, 9)}, {}, r"fc1.lora_A.weight has shape \(2, 9\), the model needs shape \(2, 8\)"),
        (GOOD | {"base_model.model.fc1.magic": torch.zeros(1)}, {}, "unexpected key 'base_model.model.fc1.magic'"),
        (GOOD | {"base_model.model.fc2.lora_A.weight": torch.zeros(2, 16)}, {}, r"weights for \['fc2'\]"),
        (GOOD, {"target_modules": ["fc1", "fc2"]}, r"no lora_A/lora_B weights for targeted modules \['fc2'\]"),
        (GOOD, {"use_dora": True}, "use_dora=True is not supported"),
        (GOOD, {"peft_type": "IA3"}, "only 'LORA'"),
        (GOOD, {"lora_alpha": None}, "required field 'lora_alpha' is missing"),
    ],
)
def test_load_adapter_errors_name_keys_and_shapes(tmp_path, tensors, config, message):
    _write_adapter(tmp_path / "adapter", tensors, **config)
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(MLP(), tmp_path / "adapter")


def test_load_adapter_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.load_adapter(MLP(), tmp_path)


def test_load_adapter_reads_peft_base_layer_weight(tmp_path):
    """peft saves a targeted lm_head's base weight as `lm_head.base_layer.weight`; it is loaded into the base."""
    head = torch.randn(11, 8)
    tensors = {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(11, 2),
               "base_model.model.lm_head.base_layer.weight": head}
    _write_adapter(tmp_path / "a", tensors, target_modules=["lm_head"])
    model = lora.load_adapter(TinyLM(), tmp_path / "a")
    assert torch.equal(model.lm_head.weight, head) and model.lm_head.weight is model.embed_tokens.weight


def _good_adapter(path) -> dict[str, torch.Tensor]:
    """An adapter on TinyLM's fc1, fc2 and lm_head (r=2), written to `path`; returns its tensors."""
    model = lora.inject(TinyLM(), r=2, alpha=4, targets=["fc1", "fc2", "lm_head"])
    randomize_lora(model)
    lora.save_adapter(model, path)
    return load_file(str(path / "adapter_model.safetensors"))


def _poison(key: str, value: float):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
    return change


HEAD_A = "base_model.model.lm_head.lora_A.weight"
FC2_B = "base_model.model.blocks.1.fc2.lora_B.weight"
BAD_ADAPTERS = [  # (change to the tensors, change to adapter_config.json, error type, message)
    (lambda t: t.update({FC2_B: torch.zeros(8, 3)}), {}, ValueError,
     r"blocks.1.fc2.lora_B.weight has shape \(8, 3\), the model needs shape \(8, 2\)"),
    (None, {"r": 4}, ValueError, r"lora_A.weight has shape \(2, 8\), the model needs shape \(4, 8\) \(r=4"),
    (lambda t: t.update({"base_model.model.lm_head.base_layer.weight": torch.zeros(11, 7)}), {}, ValueError,
     r"lm_head.base_layer.weight has shape \(11, 7\), the model needs shape \(11, 8\)"),
    (lambda t: t.update({"base_model.model.lm_head.base_layer.bias": torch.zeros(11)}), {}, ValueError,
     r"lm_head.base_layer.bias has shape \(11,\), the model needs no such tensor"),
    (lambda t: t.update({"base_model.model.blocks.0.fc3.lora_A.weight": torch.zeros(2, 8)}), {}, ValueError,
     r"weights for \['blocks.0.fc3'\], which are not nn.Linear modules"),
    (None, {"target_modules": ["q_proj", "v_proj"]}, ValueError, r"weights for \['blocks.0.fc1'"),
    (_poison(FC2_B, float("nan")), {}, CheckpointError, r"blocks.1.fc2.lora_B.weight' in .* holds 1 NaN or Inf"),
    (_poison(HEAD_A, float("inf")), {}, CheckpointError, r"lm_head.lora_A.weight' in .* holds 1 NaN or Inf"),
    (lambda t: t.update({FC2_B: torch.zeros(8, 2, dtype=torch.int32)}), {}, ValueError,
     r"adapter_model.safetensors: base_model.model.blocks.1.fc2.lora_B.weight has dtype torch.int32"),
    (None, {"r": 0}, ValueError, r"adapter_config.json: r is 0; expected a positive integer"),
    (None, {"r": "2"}, ValueError, r"adapter_config.json: r is '2'"),
    (None, {"lora_dropout": 1.5}, ValueError, r"lora_dropout is 1.5; expected a number in \[0, 1\)"),
    (None, {"lora_alpha": "x"}, ValueError, r"lora_alpha is 'x'; expected a number"),
    (None, {"target_modules": 3}, ValueError, r"target_modules is 3"),
]


@pytest.mark.parametrize("change_tensors, change_config, error, message", BAD_ADAPTERS, ids=[
    "rank-of-one-tensor", "rank-in-config", "base-weight-shape", "bias-for-biasless-base", "unknown-module",
    "other-architecture", "nan", "inf", "integer-dtype", "r-zero", "r-string", "dropout-range", "alpha-string",
    "targets-type",
])
def test_failed_load_adapter_leaves_the_model_as_it_was(tmp_path, change_tensors, change_config, error, message):
    tensors = _good_adapter(tmp_path)
    if change_tensors is not None:
        change_tensors(tensors)
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | change_config))
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    for _ in range(2):  # the retry gives the same error, not "already has LoRA layers"
        with pytest.raises(error, match=message):
            lora.load_adapter(model, tmp_path)
        assert {name: type(m) for name, m in model.named_modules()} == types
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("keep", [0, 30, 0.5])  # empty, a header cut short, half the file
def test_truncated_adapter_names_the_file(tmp_path, keep):
    _good_adapter(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    model = TinyLM()
    for read in (lambda: lora.load_adapter(model, tmp_path), lambda: lora.read_adapter_weights(tmp_path)):
        with pytest.raises(CheckpointError, match=rf"{file}: not a readable safetensors file"):
            read()
    assert not lora.lora_layers(model)


def test_read_adapter_weights_refuses_non_finite_values(tmp_path):
    tensors = _good_adapter(tmp_path)
    _poison(FC2_B, float("nan"))(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'base_model.model.blocks.1.fc2.lora_B.weight' in .* holds 1 NaN"):
        lora.read_adapter_weights(tmp_path)


def test_inject_keeps_the_models_eval_mode():
    """A model in eval mode must not get LoRA layers in training mode (dropout would run while evaluating)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    lora.inject(model, r=2, dropout=0.5, targets=["0"])
    assert not model[0].training
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model(x))
    model.train()
    assert model[0].training


def test_save_merged_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(FileExistsError, match="not empty"):
        lora.save_merged(model, tmp_path)


def test_adapter_config_that_is_not_an_object_is_refused(tmp_path):
    """Before the move to ecellm.peft_format a JSON list here failed with AttributeError ('list' has no 'get')."""
    _write_adapter(tmp_path / "adapter", GOOD)
    (tmp_path / "adapter" / "adapter_config.json").write_text('["LORA"]')
    with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object, got list"):
        lora.load_adapter(MLP(), tmp_path / "adapter")


def test_peft_format_names_stay_importable_from_lora():
    from ecellm import peft_format

    assert lora.save_adapter is peft_format.save_adapter and lora.load_adapter is peft_format.load_adapter
    assert lora.read_adapter_weights is peft_format.read_adapter_weights
    with pytest.raises(AttributeError, match="has no attribute 'save_adapters'"):
        lora.save_adapters


def test_inject_refuses_targets_that_match_the_module_itself():
    """A lone nn.Linear has no parent to be replaced in: inject refuses it rather than leave a LoRA branch that the
    forward never runs (trainable parameters that never change)."""
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"targets '\.\*' match the Linear itself; .*LoRALinear\(linear, r, alpha\)"):
        lora.inject(linear, r=2, targets=".*")
    assert lora.lora_layers(linear) == {} and all(p.requires_grad for p in linear.parameters())  # left as it was


def test_lora_package_imports_one_way():
    """Each module of ecellm/lora imports only the modules listed before it (in-function imports included): no
    circle such as the old lora <-> nf4 <-> peft_format."""
    import ast
    from pathlib import Path

    order = ["targets", "layer", "nf4", "merged", "peft_format"]
    package = Path(lora.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(order + ["__init__"])
    for position, module in enumerate(order):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                     and node.module is None for alias in node.names}
        assert imported <= set(order[:position]), (module, imported)


def test_public_names_of_the_package_and_its_old_homes():
    from ecellm import nf4, peft_format

    assert {"inject", "merge", "unmerge", "save_adapter", "load_adapter", "save_merged", "LoRAError"} <= set(dir(lora))
    assert lora.inject is lora.layer.inject and lora.save_adapter is lora.peft_format.save_adapter
    assert nf4.quantize_model is lora.nf4.quantize_model and peft_format.load_adapter is lora.load_adapter
    assert issubclass(lora.LoRAError, EcellmError) and issubclass(lora.LoRAError, ValueError)


@pytest.mark.parametrize("pattern, why", [
    ("([a-z_.0-9]+)+$", "nested quantifiers backtrack exponentially"),  # hung the loader for hours
    ("(fc|f)*1", "holds another quantifier or an alternation"),
    ("(", r"not a regular expression \(missing \), unterminated subpattern"),  # was an re.error traceback
    (r"(fc)\1", "a backreference"),
    (r".*.*.*.*\.fc1", "4 repeating quantifiers in a row, at most 3"),
    ("x" * 70000, "70000 characters, the limit is 65536"),
])
def test_adapter_target_pattern_that_cannot_be_matched_in_bounded_time_is_refused(tmp_path, pattern, why):
    _write_adapter(tmp_path / "adapter", GOOD, target_modules=pattern)
    model = MLP()
    with pytest.raises(lora.LoRAError, match=rf"adapter_config.json: target_modules pattern .* refused: .*{why}"):
        lora.load_adapter(model, tmp_path / "adapter")
    assert lora.lora_layers(model) == {}
    with pytest.raises(lora.LoRAError, match=rf"^inject: target_modules pattern .* refused: .*{why}"):
        lora.inject(MLP(), targets=pattern)


def test_adapter_target_patterns_as_peft_users_write_them_load(tmp_path):
    for i, pattern in enumerate([r".*\.?fc1", r"(?:blocks\.\d+\.)?fc1", r".*fc1|.*zz", r"f.{0,2}1(?=$)"]):
        _write_adapter(tmp_path / str(i), GOOD, target_modules=pattern)
        assert list(lora.lora_layers(lora.load_adapter(MLP(), tmp_path / str(i)))) == ["fc1"]


def test_matching_a_target_pattern_stops_at_its_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(lora.targets, "MATCH_BUDGET_S", -1.0)  # every match is over budget
    _write_adapter(tmp_path / "adapter", GOOD, target_modules="fc1")
    with pytest.raises(lora.LoRAError, match=r"adapter_config.json: target_modules pattern 'fc1' refused: matching "
                                             r"it took over -1 s \(at 'fc1'\); use a list of module names"):
        lora.load_adapter(MLP(), tmp_path / "adapter")
