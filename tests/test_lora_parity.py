"""ecellm.lora on ecellm's Llama / Mistral / Phi-2 against transformers + peft (the reference), on tiny random
checkpoints: same LoRA weights -> same logits, adapters cross-load both ways, merged checkpoints load in both."""

import json

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from peft import LoraConfig, PeftModel, get_peft_model

from ecellm import lora
from ecellm.models import from_pretrained
from tests.models.hf_tiny import save_tiny_decoder

# tiny checkpoint (tests/models/hf_tiny.py) -> ecellm family name
CASES = {"llama-untied": "llama", "llama-tied-gqa": "llama", "llama-headdim-bias": "llama",
         "mistral-window": "mistral", "phi-partial": "phi"}
R, ALPHA = 4, 8


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    """(tiny checkpoint directory, family, input ids) for one tiny model family."""
    base = tmp_path / "base"
    save_tiny_decoder(request.param, base)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    return base, CASES[request.param], ids


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ours_with_lora(base):
    """Our model with the paper's default targets and non-zero LoRA weights."""
    model = lora.inject(from_pretrained(base), r=R, alpha=ALPHA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model.eval()


def peft_with_weights_of(ours, base, family):
    """transformers + peft on the same checkpoint, LoRA weights copied from ours (peft keys: `.lora_A.default`)."""
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=lora.DEFAULT_TARGETS[family], task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(base), config).eval()
    named = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            named[name].lora_A["default"].weight.copy_(layer.lora_A)
            named[name].lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model


def test_logits_and_trainable_count_match_peft(case):
    base, family, ids = case
    ours = ours_with_lora(base)
    reference = peft_with_weights_of(ours, base, family)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert not torch.allclose(expected, hf_model(base)(input_ids=ids).logits, atol=1e-3)  # LoRA does something
        torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    trainable, total = reference.get_nb_trainable_parameters()
    assert lora.count_parameters(ours) == (trainable, total)


def test_adapter_saved_by_us_loads_in_peft(case, tmp_path):
    base, family, ids = case
    ours = ours_with_lora(base)
    lora.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(lora.DEFAULT_TARGETS[family]) and config["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids), rtol=1e-5, atol=1e-5)


def test_adapter_saved_by_peft_loads_in_ours(case, tmp_path):
    base, family, ids = case
    reference = peft_with_weights_of(ours_with_lora(base), base, family)
    reference.save_pretrained(tmp_path / "adapter")
    ours = lora.load_adapter(from_pretrained(base), tmp_path / "adapter").eval()
    assert sorted(lora.lora_layers(ours)) == sorted(
        n for n, m in reference.base_model.model.named_modules() if hasattr(m, "lora_A")
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_base(case):
    base, _, ids = case
    ours = ours_with_lora(base)
    base_weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = ours(ids)
        lora.merge(ours)
        torch.testing.assert_close(ours(ids), unmerged, rtol=1e-5, atol=1e-5)
        lora.unmerge(ours)
        for key, value in base_weights.items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_save_merged_loads_in_transformers_and_ours(case, tmp_path, shard_size):
    base, _, ids = case
    ours = ours_with_lora(base)
    out = tmp_path / "merged"
    lora.save_merged(ours, out, max_shard_size=shard_size)
    index = out / "model.safetensors.index.json"
    if shard_size == "5GB":
        assert (out / "model.safetensors").is_file() and not index.exists()
    else:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    keys = [k for f in out.glob("*.safetensors") for k in load_file(str(f))]
    assert keys and not [k for k in keys if "lora" in k]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # a tied head got its own merged weight (lm_head.weight)
    assert ("lm_head.weight" in keys) and ("model.embed_tokens.weight" in keys)
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(hf_model(out)(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_pretrained(out)(ids), expected, rtol=1e-5, atol=1e-5)
    assert lora.lora_layers(ours) and not any(layer.merged for layer in lora.lora_layers(ours).values())


def test_one_training_step_changes_only_lora(tmp_path):
    save_tiny_decoder("llama-tied-gqa", tmp_path)
    model = ours_with_lora(tmp_path).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 9))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != ("lora_" in key), key


def test_bf16_base_fp32_lora_trains_under_fsdp2(tmp_path):
    """The training setup: bf16 frozen base, fp32 LoRA, FSDP2 per decoder layer (one CPU rank over gloo)."""
    save_tiny_decoder("llama-untied", tmp_path / "base")
    reference = ours_with_lora(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    lora.inject(model, r=R, alpha=ALPHA, dropout=0.1)
    model.load_state_dict(lora.lora_state_dict(reference), strict=False)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():  # the bf16 model tracks the fp32 one (bf16 noise ~0.02; the LoRA update moves logits ~1.6)
        assert (model.eval()(ids).float() - reference(ids)).abs().mean() < 0.05
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.train()
        model(ids).float().logsumexp(-1).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        assert {g.dtype for g in grads.values()} == {torch.float32}
    finally:
        dist.destroy_process_group()
