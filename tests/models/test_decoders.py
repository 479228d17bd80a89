"""Llama, Mistral and Phi-2 against transformers (the reference oracle), in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ecellm.generate import generate, left_pad
from ecellm.models import CheckpointError, ConfigError, from_config, from_pretrained

from .hf_tiny import DECODERS, save_tiny_decoder

CONFIGS = Path(__file__).parent.parent / "assets" / "configs"


@pytest.fixture(scope="module", params=sorted(DECODERS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint it saved, checkpoint dir)."""
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny_decoder(request.param, path)
    return ref, from_pretrained(path), path


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    """Within `atol` relative to the logits' scale."""
    return (a - b).abs().max().item() <= atol * max(1.0, a.abs().max().item())


def test_logits_match(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert close(ref(ids).logits, ours(ids))


def test_logits_match_with_left_padding(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, mask)
    real = mask.bool()
    assert close(a[real], b[real])


def test_loss_matches_and_label_only_projection(pair):
    ref, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt, masked
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as in training
    labels[1, 9:] = -100
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, labels=labels).loss
        full = F.cross_entropy(ours(ids, mask)[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
        ours_loss = ours(ids, mask, labels=labels)
    assert abs(expected.item() - ours_loss.item()) < 1e-5
    assert abs(full.item() - ours_loss.item()) < 1e-5


def test_greedy_generation_matches_transformers_batched_and_alone(pair):
    ref, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (7, 2, 11)]
    ids, mask = left_pad(prompts, pad_id=0)
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[:, ids.shape[1] :].tolist()
    assert any(len(set(row)) > 2 for row in expected), "degenerate oracle output: the test would prove little"
    assert generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[]) == expected
    alone = [generate(ours, torch.tensor([p]), max_new_tokens=10, eos_token_id=[])[0] for p in prompts]
    assert alone == expected


def test_generation_stops_each_row_at_eos(pair):
    _, ours, _ = pair
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = left_pad(prompts, pad_id=0)
    free = generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = free[0][2]
    stopped = generate(ours, ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    row1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == row1


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(pair):
    _, ours, _ = pair
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    a = generate(ours, ids, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7, eos_token_id=[])
    b = generate(ours, ids, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7, eos_token_id=[])
    assert a == b
    greedy = generate(ours, ids, max_new_tokens=8, eos_token_id=[])
    assert generate(ours, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3, eos_token_id=[]) == greedy


def test_tied_embeddings_stay_tied(tmp_path):
    save_tiny_decoder("llama-tied-gqa", tmp_path)
    model = from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path):
    ref = save_tiny_decoder("llama-untied", tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "one")(ids), from_pretrained(tmp_path / "sharded")(ids))


def test_dtype_cast_on_load(tmp_path):
    save_tiny_decoder("phi-partial", tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.arange(1, 6)[None]).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama-2-7b-chat", 6_738_415_616),
        ("llama-2-13b-chat", 13_015_864_320),
        ("mistral-7b-instruct-v0.2", 7_241_732_096),
        ("phi-2", 2_779_683_840),
    ],
)
def test_real_configs_build_with_published_parameter_counts(name, expected):
    model = from_config(CONFIGS / f"{name}.json")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_new_style_config_fields(tmp_path):
    """transformers >= 5 writes rope_parameters/dtype; older ones rope_theta/partial_rotary_factor/torch_dtype."""
    old = json.loads((CONFIGS / "phi-2.json").read_text())
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "partial_rotary_factor", "torch_dtype")}
    new.update(dtype="float16",
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4})
    a, b = from_config(old).config, from_config(new).config
    assert (a.rotary_dim, a.rope_theta) == (b.rotary_dim, b.rope_theta) == (32, 10000.0)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert close(ref(ids).logits, from_pretrained(tmp_path)(ids))


def test_unsupported_rope_scaling_names_the_type():
    config = json.loads((CONFIGS / "llama-2-7b-chat.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 2.0}
    with pytest.raises(ConfigError, match="'yarn'"):
        from_config(config)


# --- bad inputs -------------------------------------------------------------------------------------------------


def _edit_checkpoint(path, fn):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    _edit_checkpoint(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight' \(shape \(64, 32\)\)"):
        from_pretrained(tmp_path)


def test_wrong_shape_names_key_file_and_shapes(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    _edit_checkpoint(tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(31)}))
    expected = r"'model.norm.weight' in .*model.safetensors has shape \(31,\), the model expects \(32,\)"
    with pytest.raises(CheckpointError, match=expected):
        from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    _edit_checkpoint(tmp_path, lambda s: s.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        from_pretrained(tmp_path)


def test_corrupt_config_names_the_file(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        from_pretrained(tmp_path)


def test_unknown_model_type_lists_supported(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt_neox'; supported: .*llama, mistral, phi"):
        from_pretrained(tmp_path)


def test_pickle_checkpoints_refused_unless_opted_in(tmp_path):
    ref = save_tiny_decoder("llama-untied", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        from_pretrained(tmp_path)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert close(ref(ids).logits, from_pretrained(tmp_path, allow_pickle=True)(ids))


def test_truncated_pickle_checkpoint_names_the_file(tmp_path):
    ref = save_tiny_decoder("llama-untied", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable torch weights file"):
        from_pretrained(tmp_path, allow_pickle=True)
    torch.save([1, 2], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: holds a list"):
        from_pretrained(tmp_path, allow_pickle=True)


def test_tied_weights_with_different_values_are_refused(tmp_path):
    """A config that ties lm_head to the embeddings while the file holds a different lm_head must not load silently."""
    save_tiny_decoder("llama-tied-gqa", tmp_path)
    _edit_checkpoint(tmp_path, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1.0}))
    with pytest.raises(CheckpointError, match=r"different values for 'model.embed_tokens.weight' and 'lm_head.weight'"):
        from_pretrained(tmp_path)
