"""The FLOP ledger against torch's FlopCounterMode: full fine-tuning, LoRA and mixture-of-experts
training steps of tiny transformers models (eager attention: its bmm's cover the full T x T square,
the count's causal term is replaced by that square here)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from grades.ttc import FlopLedger, LoraSpec, active_weights, matrix_shapes, training_flops

B, T = 2, 6


def counted_step(model, vocab: int) -> float:
    """FLOPs of one forward + backward, as FlopCounterMode counts them."""
    x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    fc = FlopCounterMode(display=False)
    with fc:
        model(input_ids=x, labels=x).loss.backward()
    return float(fc.get_total_flops())


def square_attention(cfg) -> float:
    """Eager attention's training FLOPs: QK^T and AV over the full square, forward + 2x backward."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 3 * 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * T * T * B


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return cfg, LlamaForCausalLM(cfg)


def test_full_fine_tuning_matches_flop_counter():
    cfg, model = llama()
    assert counted_step(model, 24) == training_flops(cfg, B * T) + square_attention(cfg)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r".*\.mlp\.(up|down)_proj"])
def test_lora_matches_flop_counter(targets):
    from peft import LoraConfig, get_peft_model
    cfg, model = llama()
    lcfg = LoraConfig(r=3, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, lcfg)
    peft_model.enable_input_require_grads()  # input gradients everywhere (see grades.ttc.flops)
    got = counted_step(peft_model, 24)
    want = training_flops(cfg, B * T, lora=lcfg) + square_attention(cfg)
    assert got == want
    # by hand: base frozen (4 N), adapters 6 r (in + out)
    adapters = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    extra = sum(6 * 3 * (m.in_features + m.out_features) for m in adapters.values())
    assert want == B * T * (4 * sum(active_weights(cfg).values()) + extra) + square_attention(cfg)
    assert training_flops(cfg, B * T, lora=LoraSpec(3, targets)) == training_flops(cfg, B * T, lora=lcfg)


def test_lora_with_frozen_adapters_and_ledger():
    from peft import LoraConfig
    cfg, _ = llama()
    lcfg = LoraConfig(r=4, target_modules=["q_proj"])
    full = training_flops(cfg, 10, lora=lcfg)
    frozen = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
              "model.layers.1.self_attn.q_proj.lora_B.default"]
    # A of layer 0 loses 2 r in, B of layer 1 loses 2 out r
    assert training_flops(cfg, 10, lora=lcfg, frozen=frozen) == full - 10 * (2 * 4 * 32 + 2 * 32 * 4)
    assert training_flops(cfg, 10, lora=lcfg, frozen=["model.layers.0.mlp.up_proj"]) == full  # frozen already
    with pytest.raises(ValueError, match="has none here"):
        training_flops(cfg, 10, lora=lcfg, frozen=["model.layers.0.mlp.up_proj.lora_A.default.weight"])
    led = FlopLedger(cfg, seq_len=T, lora=lcfg)
    led.add_step(12, frozen=frozen[:1])
    assert led.dense_flops == training_flops(cfg, 12, seq_len=T, lora=lcfg) > led.train_flops


def test_lora_setups_not_covered_are_refused():
    from peft import LoraConfig
    cfg, _ = llama()
    for kw, match in ((dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
                      (dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(use_dora=True), "DoRA")):
        with pytest.raises(ValueError, match=match):
            training_flops(cfg, 1, lora=LoraConfig(r=2, target_modules=["q_proj"], **kw))
    with pytest.raises(ValueError, match="match none"):
        training_flops(cfg, 1, lora=LoraSpec(2, ["nope"]))
    with pytest.raises(TypeError, match="lora must be"):
        training_flops(cfg, 1, lora={"r": 2})
    with pytest.raises(ValueError, match="lora r"):
        training_flops(cfg, 1, lora=LoraSpec(0, ["q_proj"]))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=24, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=12,
                         shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                         mlp_only_layers=[1], attn_implementation="eager", experts_implementation="eager")
    return cfg, Qwen2MoeForCausalLM(cfg)


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=16, num_local_experts=3, num_experts_per_tok=2,
                        attn_implementation="eager", experts_implementation="eager")
    return cfg, MixtralForCausalLM(cfg)


@pytest.mark.parametrize("build", [qwen2_moe, mixtral])
def test_moe_matches_flop_counter(build):
    cfg, model = build()
    assert counted_step(model, 24) == training_flops(cfg, B * T) + square_attention(cfg)
    # the counted matrices are the model's own weights (expert tensors flattened over experts)
    params = {n[:-len(".weight")] if n.endswith(".weight") else n: p.shape for n, p in model.named_parameters()
              if p.ndim >= 2 and "embed" not in n}
    shapes = matrix_shapes(cfg)
    assert set(params) == set(shapes)
    for name, shp in params.items():
        assert shapes[name] == (shp[0] * shp[1], shp[2]) if len(shp) == 3 else shapes[name] == tuple(shp)


def test_moe_active_weights_by_hand():
    cfg, _ = qwen2_moe()
    a = active_weights(cfg)
    # layer 0 sparse: k / E = 1/2 of the experts' 4 x (2 x 12 x 32 + 32 x 12) weights
    assert a["model.layers.0.mlp.experts.gate_up_proj"] == 2 * 2 * 12 * 32
    assert a["model.layers.0.mlp.experts.down_proj"] == 2 * 32 * 12
    assert "model.layers.1.mlp.up_proj" in a and "model.layers.1.mlp.gate" not in a  # mlp_only_layers
    frozen = ["model.layers.2.mlp.experts.down_proj"]
    assert training_flops(cfg, 5, frozen=frozen) == training_flops(cfg, 5) - 5 * 2 * (2 * 32 * 12)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.num_experts_per_tok = 5
        training_flops(cfg, 1)
