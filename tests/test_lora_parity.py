"""ecellm.lora on ecellm's Llama / Mistral / Qwen2 / Qwen3 / Phi-2 / T5 against transformers + peft (the reference),
on tiny random checkpoints: same LoRA weights -> same logits, adapters cross-load both ways, merged checkpoints load in
both."""

import json
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard

from ecellm import lora
from ecellm.models import from_pretrained
from tests.models.hf_tiny import save_tiny_decoder

# tiny checkpoint -> ecellm family name (decoders from tests/models/hf_tiny.py, T5s from save_tiny_t5 below)
# fp32 logits summed in another order: flan-t5's largest gap is 1.04e-5 on torch 2.13 (LoRA's own effect is > 1e-3)
LOGIT_ATOL = 2e-5
CASES = {"llama-untied": "llama", "llama-tied-gqa": "llama", "llama-headdim-bias": "llama",
         "mistral-window": "mistral", "qwen2-tied": "qwen2", "qwen3-headdim": "qwen3", "phi-partial": "phi",
         "flan-t5": "t5", "t5-original": "t5"}
T5S = {  # Flan-T5 layout (gated `wi_0`/`wi_1`, no output scaling) and original T5 (`wi`, scaled tied head)
    "flan-t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}
R, ALPHA = 4, 8
pytestmark = [  # peft's advice about saving a targeted lm_head, expected here
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]


def save_tiny_t5(name, path):
    config = transformers.T5Config(vocab_size=97, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, **T5S[name])
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():  # non-trivial norms, so a missed weight shows up in the logits
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)


class Case(NamedTuple):
    name: str
    base: object  # the tiny checkpoint's directory
    family: str
    inputs: dict  # forward kwargs, the same for transformers and ecellm


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    base = tmp_path / "base"
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 97, (2, 9), generator=g)}
    if CASES[request.param] == "t5":
        save_tiny_t5(request.param, base)
        inputs["decoder_input_ids"] = torch.randint(0, 97, (2, 5), generator=g)
    else:
        save_tiny_decoder(request.param, base)
    return Case(request.param, base, CASES[request.param], inputs)


def hf_model(path, family):
    auto = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


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
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=lora.DEFAULT_TARGETS[family],
                        task_type=lora.TASK_TYPES[family])
    peft_model = get_peft_model(hf_model(base, family), config).eval()
    named = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            named[name].lora_A["default"].weight.copy_(layer.lora_A)
            named[name].lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model


def test_default_targets_are_the_papers(case):
    llama = "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head"
    paper = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama,
             "phi": "q_proj k_proj v_proj dense fc1 fc2 lm_head",
             "flan-t5": "q k v o wi_0 wi_1 wo lm_head", "t5-original": "q k v o wi wo lm_head"}
    expected = paper["flan-t5" if case.name == "flan-t5" else case.name if case.family == "t5" else case.family]
    assert {name.rpartition(".")[2] for name in lora.lora_layers(ours_with_lora(case.base))} == set(expected.split())


def test_logits_and_trainable_count_match_peft(case):
    base, family, inputs = case.base, case.family, case.inputs
    ours = ours_with_lora(base)
    reference = peft_with_weights_of(ours, base, family)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert not torch.allclose(expected, hf_model(base, family)(**inputs).logits, atol=1e-3)  # LoRA acts
        torch.testing.assert_close(ours(**inputs), expected, rtol=1e-5, atol=LOGIT_ATOL)
    trainable, total = reference.get_nb_trainable_parameters()
    assert lora.count_parameters(ours) == (trainable, total)


def test_adapter_saved_by_us_loads_in_peft(case, tmp_path):
    base, family, inputs = case.base, case.family, case.inputs
    ours = ours_with_lora(base)
    lora.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == lora.TASK_TYPES[family]
    assert config["target_modules"] == sorted({n.rpartition(".")[2] for n in lora.lora_layers(ours)})
    loaded = PeftModel.from_pretrained(hf_model(base, family), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs), rtol=1e-5, atol=LOGIT_ATOL)


def test_adapter_saved_by_peft_loads_in_ours(case, tmp_path):
    base, family, inputs = case.base, case.family, case.inputs
    reference = peft_with_weights_of(ours_with_lora(base), base, family)
    reference.save_pretrained(tmp_path / "adapter")
    ours = lora.load_adapter(from_pretrained(base), tmp_path / "adapter").eval()
    assert sorted(lora.lora_layers(ours)) == sorted(
        n for n, m in reference.base_model.model.named_modules() if hasattr(m, "lora_A")
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), reference(**inputs).logits, rtol=1e-5, atol=LOGIT_ATOL)


def merged_tolerance(case):
    """Merged weights round differently from the unmerged two-path sum; T5 (no 1/sqrt(d) attention scaling, logits
    ~20 here) amplifies that fp32 rounding to ~5e-5."""
    return dict(rtol=1e-5, atol=1e-4 if case.family == "t5" else 1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_base(case):
    ours = ours_with_lora(case.base)
    base_weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = ours(**case.inputs)
        lora.merge(ours)
        torch.testing.assert_close(ours(**case.inputs), unmerged, **merged_tolerance(case))
        lora.unmerge(ours)
        for key, value in base_weights.items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(**case.inputs), unmerged, **merged_tolerance(case))


@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_save_merged_loads_in_transformers_and_ours(case, tmp_path, shard_size):
    ours = ours_with_lora(case.base)
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
    embedding = "shared.weight" if case.family == "t5" else "model.embed_tokens.weight"
    assert "lm_head.weight" in keys and embedding in keys
    with torch.no_grad():
        expected = ours(**case.inputs)
        torch.testing.assert_close(hf_model(out, case.family)(**case.inputs).logits, expected, **merged_tolerance(case))
        torch.testing.assert_close(from_pretrained(out)(**case.inputs), expected, **merged_tolerance(case))
    assert lora.lora_layers(ours) and not any(layer.merged for layer in lora.lora_layers(ours).values())


def test_save_merged_keeps_t5_output_scaling_of_an_old_config(tmp_path):
    """Old T5 configs lack `scale_decoder_outputs` and let `tie_word_embeddings` decide it; untying the merged head
    must not switch the scaling off."""
    save_tiny_t5("t5-original", tmp_path / "base")
    config_file = tmp_path / "base" / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "scale_decoder_outputs"}))
    ours = ours_with_lora(tmp_path / "base")
    lora.save_merged(ours, tmp_path / "merged")
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (merged_config["tie_word_embeddings"], merged_config["scale_decoder_outputs"]) == (False, True)
    inputs = {"input_ids": torch.randint(0, 97, (2, 9)), "decoder_input_ids": torch.randint(0, 97, (2, 5))}
    with torch.no_grad():
        expected = ours(**inputs)
        torch.testing.assert_close(from_pretrained(tmp_path / "merged")(**inputs), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(hf_model(tmp_path / "merged", "t5")(**inputs).logits, expected, rtol=1e-5, atol=1e-4)


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
