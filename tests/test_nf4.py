"""ecellm.nf4 against bitsandbytes (the oracle): the same codes, scales and dequantized values bit for bit, and a LoRA
step on a 4-bit base equal to peft's on the oracle's dequantized weights.

The oracle is bitsandbytes' `quantize_4bit(..., quant_type="nf4")` with QLoRA's double quantization (absmax minus its
mean, 8-bit dynamic map in blocks of 256) through bitsandbytes' portable PyTorch kernels. Its CPU C kernel for the
8-bit step searches the map approximately and lands one or two entries off now and then (one scale code in
~1000): `test_bnb_cpu_kernel_differs_only_in_rare_scale_codes` pins that difference. peft + bitsandbytes QLoRA itself
does not run double quantization on the CPU (transformers stores bf16 scales there), so the step is compared with
peft on a base whose weights are the oracle's dequantized ones.
"""

import json

import bitsandbytes.functional as bnb
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from ecellm import lora, nf4
from ecellm.models import from_pretrained
from ecellm.synthetic import write_dataset
from ecellm.train import TrainConfig, TrainingError, check_config, train

from .tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PORTABLE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)  # bitsandbytes' PyTorch kernels


def bnb_nf4(weight):
    """bitsandbytes' NF4 with double quantization: (codes, scale codes, scale scales, offset, dequantize(dtype))."""
    codes, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    dynamic = bnb.create_dynamic_map()  # a fresh map: bitsandbytes' CPU kernel overwrites entry 0 of its cached one
    offset = state.absmax.mean()
    scale_codes, scale_scales = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        PORTABLE, state.absmax - offset, dynamic, 256)
    state.absmax = bnb.dequantize_blockwise(scale_codes, absmax=scale_scales, code=dynamic, blocksize=256) + offset

    def dequantize(dtype):
        state.dtype = dtype
        return bnb.dequantize_4bit(codes, state)

    return codes.view(-1), scale_codes, scale_scales, offset, dequantize


def random_weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1).to(dtype)


def test_tables_are_bitsandbytes():
    assert torch.equal(nf4.NF4, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC, bnb.create_dynamic_map())


# (300, 192): 900 blocks, 4 scale blocks, the last one partial; (64, 64): one partial scale block
@pytest.mark.parametrize("shape", [(300, 192), (64, 64), (1024, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_equals_bitsandbytes_bit_for_bit(shape, dtype):
    for seed in range(3):
        weight = random_weight(shape, dtype, seed)
        codes, scale_codes, scale_scales, offset, dequantize = bnb_nf4(weight)
        ours = nf4.quantize(weight)
        assert torch.equal(ours.codes, codes)
        assert torch.equal(ours.scale_codes, scale_codes)
        assert torch.equal(ours.scale_scales, scale_scales)
        assert torch.equal(ours.scale_offset, offset)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(ours.dequantize(out_dtype), dequantize(out_dtype))


def test_bnb_cpu_kernel_differs_only_in_rare_scale_codes():
    weight = random_weight((4096, 256), torch.float32, 0)
    codes, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize(weight)
    assert torch.equal(ours.codes, codes.view(-1))
    assert torch.equal(ours.scale_scales, state.state2.absmax) and torch.equal(ours.scale_offset, state.offset)
    steps = (ours.scale_codes.int() - state.absmax.int()).abs()
    assert steps.max() <= 2 and (steps > 0).float().mean() < 0.01


def test_quantize_refuses_a_width_off_the_block():
    with pytest.raises(ValueError, match=r"shape \(8, 96\).*multiple of 64"):
        nf4.quantize(torch.randn(8, 96))


def test_linear_keeps_only_4bit_weights_for_backward():
    weight = random_weight((128, 64), torch.float32, 2)
    quantized = nf4.quantize(weight)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = quantized(x)
    assert not [t for t in saved if t.numel() >= weight.numel() and t.is_floating_point()]
    grad = torch.randn_like(out)
    out.backward(grad)
    x2 = x.detach().requires_grad_()
    expected = torch.nn.functional.linear(x2, quantized.dequantize())
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.allclose(x.grad, x2.grad, atol=1e-6)


def save_tiny_llama(path, **overrides):
    """A tiny Llama whose widths are multiples of 64 (down_proj's is not when intermediate_size is 96)."""
    sizes = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    config = transformers.LlamaConfig(**{**sizes, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else 0.25 * torch.randn_like(p))
    model.save_pretrained(path)


def test_quantize_model_names_what_it_left(tmp_path):
    save_tiny_llama(tmp_path, intermediate_size=96, tie_word_embeddings=True)
    model = lora.inject(from_pretrained(tmp_path), r=4, alpha=8, targets=["q_proj", "v_proj"])
    report = nf4.quantize_model(model, skip=["k_proj"])
    assert report.left == {
        **{f"model.layers.{i}.self_attn.k_proj": "skipped by name" for i in range(2)},
        **{f"model.layers.{i}.mlp.down_proj": "width 96 is not a multiple of 64" for i in range(2)},
        "lm_head": "weight tied to model.embed_tokens.weight",
    }
    assert len(report.quantized) == 2 * 5  # per layer: q, v (LoRA) and o, gate, up (NF4Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, nf4.NF4Weight)
    assert isinstance(model.model.layers[0].self_attn.o_proj, nf4.NF4Linear)
    assert "lm_head (weight tied to model.embed_tokens.weight)" in report.summary()
    again = nf4.quantize_model(model, skip=["k_proj"])  # the 4-bit layers are passed over, the others left again
    assert not again.quantized and again.left == report.left


def quantized_step(path, targets):
    """Our LoRA model on the 4-bit base: (model, loss, {LoRA parameter: grad}) for one batch."""
    model = lora.inject(from_pretrained(path), r=4, alpha=8, targets=targets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)  # B = 0 would zero A's gradient
    nf4.quantize_model(model)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    loss = model(ids, labels=ids)
    loss.backward()
    return model, ids, loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_step_equals_peft_on_the_oracle_weights(tmp_path):
    save_tiny_llama(tmp_path, tie_word_embeddings=False)
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    ours, ids, loss, grads = quantized_step(tmp_path, targets)

    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():  # every linear of our model is quantized: give the reference the oracle's weights
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(bnb_nf4(module.weight)[4](torch.float32))
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    named = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            named[name].lora_A["default"].weight.copy_(layer.lora_A)
            named[name].lora_B["default"].weight.copy_(layer.lora_B)
    expected = peft_model(input_ids=ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name, layer in lora.lora_layers(ours).items():
        torch.testing.assert_close(grads[f"{name}.lora_A"], named[name].lora_A["default"].weight.grad, atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(grads[f"{name}.lora_B"], named[name].lora_B["default"].weight.grad, atol=1e-5,
                                   rtol=1e-4)


def test_adapter_from_a_4bit_base_loads_on_the_full_base(tmp_path):
    save_tiny_llama(tmp_path / "base", tie_word_embeddings=False)
    ours, *_ = quantized_step(tmp_path / "base", None)
    lora.save_adapter(ours, tmp_path / "adapter")
    full = lora.load_adapter(from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert lora.lora_state_dict(full).keys() == lora.lora_state_dict(ours).keys()
    for key, value in lora.lora_state_dict(ours).items():
        assert torch.equal(lora.lora_state_dict(full)[key], value)
    lora.merge(full)  # the full-precision copy merges


def test_merge_refuses_a_4bit_base(tmp_path):
    save_tiny_llama(tmp_path / "base", tie_word_embeddings=False)
    ours, *_ = quantized_step(tmp_path / "base", ["q_proj"])
    with pytest.raises(ValueError, match="merge: model.layers.0.self_attn.q_proj.weight .* bf16/fp32 copy"):
        lora.merge(ours)
    with pytest.raises(ValueError, match="save_merged: .* 4-bit NF4 weight"):
        lora.save_merged(ours, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_train_with_quantize_nf4_learns_and_writes_a_plain_adapter(tmp_path, capsys):
    base = make_tiny_checkpoint(tmp_path / "model", hidden_size=64, intermediate_size=128)
    write_dataset(tmp_path / "data", n_per_task=16, n_eval_per_task=4, seed=0, tasks=["SR"])
    config = TrainConfig(model=str(base), data=str(tmp_path / "data"), out=str(tmp_path / "run"), tasks="SR",
                         dtype="fp32", lr=1e-2, lora_dropout=0.0, epochs=2, global_batch=8, micro_batch=4,
                         max_len=512, quantize="nf4", activation_checkpointing=True)
    train(config)
    assert "nf4: quantized 15 linear layers; left in full precision: none" in capsys.readouterr().err  # 7 a layer, head
    log = (tmp_path / "run" / "log.jsonl").read_text()
    losses = [json.loads(line)["loss"] for line in log.splitlines() if '"type": "step"' in line]
    assert losses[-1] < losses[0], losses
    full = lora.load_adapter(from_pretrained(base), tmp_path / "run" / "adapter")
    assert lora.lora_layers(full)


def test_train_refuses_quantize_with_fsdp():
    config = TrainConfig(data="d", quantize="nf4", global_batch=2)
    with pytest.raises(TrainingError, match="quantize nf4 runs in one process, this run has 2: FSDP2"):
        check_config(config, world=2)
    with pytest.raises(TrainingError, match="quantize must be 'nf4' or None \\(off\\), got 'int8'"):
        check_config(TrainConfig(data="d", quantize="int8"), world=1)
