"""FLOP accounting for decoder-only transformers (Llama, Qwen2/3, Mistral-style configs).

Counting rules (all values are floats, in FLOPs; one multiply-add = 2 FLOPs):

* **Dense matrices.** N is the number of weights in the matrices every token passes through: per
  layer the attention projections q, k, v, o and the MLP gate, up, down, plus the LM head.
  Embedding lookups are not matrix products and are excluded; norms and biases are ignored (they
  are O(hidden) per token). A trainable matrix of ``P`` weights costs ``6 P`` per training token
  (forward 2P, input-gradient GEMM 2P, weight-gradient GEMM 2P). A matrix frozen by GradES keeps
  its forward and its input-gradient GEMM (gradients still flow through it) but loses the
  weight-gradient GEMM: ``4 P``. The input gradient is counted for every matrix, even where no
  earlier parameter would need it (a slight overcount for fully frozen prefixes).
* **Attention scores and values.** Per layer, a query attending to ``c`` keys costs
  ``2 * heads * head_dim * c`` for ``Q K^T`` and the same for ``softmax(.) V``. With causal
  masking the token at position ``t`` (1-based) attends to ``t`` keys, so a sequence of length
  ``T`` averages ``(T + 1) / 2`` keys per token: forward ``4 * L * heads * head_dim * (T+1)/2``
  per token; training (forward + backward, which has two GEMMs per forward GEMM) three times that.
  Kernels that compute the full ``T x T`` square and mask it do more work than this count.
* **Mixture of experts** (Qwen2-MoE, Qwen3-MoE, Mixtral configs). A sparse layer's MLP is a
  router (``mlp.gate``, E x hidden), E experts stored as two tensors (``mlp.experts.gate_up_proj``
  and ``mlp.experts.down_proj``, listed flattened over experts) of which each token uses
  ``num_experts_per_tok`` = k, and, for Qwen2-MoE, a shared expert and its gate. What a token costs
  is its *active* weights: an expert tensor counts ``k / E`` of its size. Which layers are sparse
  follows the config (``mlp_only_layers``, ``decoder_sparse_step``). Real runs can drop tokens at
  full experts (capacity limits); this count does not.
* **LoRA** (``lora=``: a PEFT ``LoraConfig`` or :class:`LoraSpec`). Every base matrix is frozen:
  ``4 P`` (forward, input gradient). An adapter of rank r on an ``out x in`` matrix adds
  ``A: r x in`` and ``B: out x r``, trainable: ``6 r (in + out)`` per token (the scaling and dropout
  are elementwise and not counted). The input gradient is counted everywhere, as autograd computes
  it when the embeddings' output requires grad (PEFT's ``enable_input_require_grads``, used with
  gradient checkpointing); without that, layer 0 skips a few GEMMs and this is a slight overcount.
  GradES-frozen adapter weights (names with ``lora_A``/``lora_B``) lose their weight-gradient GEMM.
* **Inference.** A generated token with a KV cache over ``c`` context positions (itself included)
  costs ``2 N + 4 * L * heads * head_dim * c``; a whole sample is counted by
  :func:`inference_flops_per_sample`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .._checks import check_number

__all__ = ["ModelShape", "LoraSpec", "model_shape", "matrix_shapes", "active_weights", "training_flops",
           "inference_flops_per_token", "inference_flops_per_sample", "FlopLedger"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes that FLOP counts need (read from a transformers config)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: tuple[int, ...] = ()


def _moe_fields(config, layers: int, inter: int) -> dict:
    """The MoE fields of :class:`ModelShape` (empty for a dense config)."""
    experts = int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)
    if not experts:
        return {}
    k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if not 1 <= k <= experts:
        raise ValueError(f"config.num_experts_per_tok must be in [1, {experts}], got {k}")
    only = set(getattr(config, "mlp_only_layers", None) or ())
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    sparse = tuple(i for i in range(layers) if i not in only and (i + 1) % step == 0)
    return {"experts": experts, "experts_per_token": k,
            "expert_intermediate": int(getattr(config, "moe_intermediate_size", None) or inter),
            "shared_intermediate": int(getattr(config, "shared_expert_intermediate_size", 0) or 0),
            "sparse_layers": sparse}


def model_shape(config) -> ModelShape:
    """Read a decoder config: dense (``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``, ...) or
    mixture-of-experts (``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``MixtralConfig``)."""
    if isinstance(config, ModelShape):
        return config
    try:
        h = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        inter = int(config.intermediate_size)
        vocab = int(config.vocab_size)
    except AttributeError as e:
        raise TypeError(f"config lacks a field of a dense decoder transformer config: {e}") from None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    for name, v in (("hidden_size", h), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                    ("intermediate_size", inter), ("vocab_size", vocab), ("head_dim", hd)):
        if v < 1:
            raise ValueError(f"config.{name} must be >= 1, got {v}")
    return ModelShape(h, layers, heads, int(kv), int(hd), inter, vocab, **_moe_fields(config, layers, inter))


def matrix_shapes(config) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of every counted matrix, named as in
    transformers' Llama/Qwen/Mixtral modules (``model.layers.0.self_attn.q_proj``, ...,
    ``lm_head``); a sparse layer's expert tensors appear flattened over experts
    (``mlp.experts.gate_up_proj``: ``(E * 2 I, hidden)``)."""
    return {name: (o, i) for name, (o, i, _) in _matrices(config).items()}


def active_weights(config) -> dict[str, float]:
    """Weights each token passes through, per matrix: ``out * in``, times ``k / E`` for experts."""
    return {name: o * i * frac for name, (o, i, frac) in _matrices(config).items()}


def _matrices(config) -> dict[str, tuple[int, int, float]]:
    s = model_shape(config)
    out: dict[str, tuple[int, int, float]] = {}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj"] = (s.heads * s.head_dim, s.hidden, 1.0)
        out[p + "self_attn.k_proj"] = (s.kv_heads * s.head_dim, s.hidden, 1.0)
        out[p + "self_attn.v_proj"] = (s.kv_heads * s.head_dim, s.hidden, 1.0)
        out[p + "self_attn.o_proj"] = (s.hidden, s.heads * s.head_dim, 1.0)
        if i in s.sparse_layers:
            e, m = s.experts, s.expert_intermediate
            out[p + "mlp.gate"] = (e, s.hidden, 1.0)
            out[p + "mlp.experts.gate_up_proj"] = (e * 2 * m, s.hidden, s.experts_per_token / e)
            out[p + "mlp.experts.down_proj"] = (e * s.hidden, m, s.experts_per_token / e)
            if s.shared_intermediate:
                out[p + "mlp.shared_expert.gate_proj"] = (s.shared_intermediate, s.hidden, 1.0)
                out[p + "mlp.shared_expert.up_proj"] = (s.shared_intermediate, s.hidden, 1.0)
                out[p + "mlp.shared_expert.down_proj"] = (s.hidden, s.shared_intermediate, 1.0)
                out[p + "mlp.shared_expert_gate"] = (1, s.hidden, 1.0)
        else:
            out[p + "mlp.gate_proj"] = (s.intermediate, s.hidden, 1.0)
            out[p + "mlp.up_proj"] = (s.intermediate, s.hidden, 1.0)
            out[p + "mlp.down_proj"] = (s.hidden, s.intermediate, 1.0)
    out["lm_head"] = (s.vocab, s.hidden, 1.0)
    return out


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters: rank ``r`` on the matrices named by ``target_modules`` (as PEFT reads them:
    a list of name suffixes such as ``["q_proj", "v_proj"]``, ``"all-linear"`` (every matrix but
    the LM head), or one regular expression matched against the whole module name)."""

    r: int
    target_modules: Sequence[str] | str


def _lora(lora) -> LoraSpec | None:
    """A :class:`LoraSpec` from one, or from a PEFT ``LoraConfig`` (duck-typed)."""
    if lora is None or isinstance(lora, LoraSpec):
        spec = lora
    elif hasattr(lora, "r") and hasattr(lora, "target_modules"):
        for attr, what in (("rank_pattern", "per-module ranks (rank_pattern)"),
                           ("modules_to_save", "fully trained modules (modules_to_save)"),
                           ("use_dora", "DoRA"), ("target_parameters", "adapters on parameters")):
            if getattr(lora, attr, None):
                raise ValueError(f"the LoRA FLOP count does not cover {what}")
        spec = LoraSpec(lora.r, lora.target_modules)
    else:
        raise TypeError(f"lora must be a LoraSpec or a peft LoraConfig, got {type(lora).__name__}")
    if spec is not None:
        check_number(spec.r, "lora r", lo=1, integer=True)
        t = spec.target_modules
        if not (isinstance(t, str) or (isinstance(t, (list, tuple, set, frozenset)) and t
                                        and all(isinstance(x, str) for x in t))):
            raise TypeError("lora target_modules must be a string or a non-empty sequence of strings")
    return spec


def _lora_targets(spec: LoraSpec, shapes: dict[str, tuple[int, int, float]]) -> list[str]:
    """The matrices ``spec`` puts adapters on (experts' 3D tensors are parameters, not modules)."""
    names = [n for n, (_, _, frac) in shapes.items() if frac == 1.0]
    t = spec.target_modules
    if t == "all-linear":
        hit = [n for n in names if n != "lm_head"]
    elif isinstance(t, str):
        hit = [n for n in names if re.fullmatch(t, n)]
    else:
        hit = [n for n in names if any(n == x or n.endswith("." + x) for x in t)]
    if not hit:
        raise ValueError(f"lora target_modules {t!r} match none of the counted matrices "
                         f"(e.g. {next(iter(shapes))!r})")
    return hit


def _norm_name(name: str) -> str:
    """Module name as in :func:`matrix_shapes`: drops a ``.weight`` suffix and a PEFT
    ``base_model.model.`` prefix (GradES component names of full fine-tuning match directly)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name[:-len(".weight")] if name.endswith(".weight") else name


def _frozen_weights(active: dict[str, float], frozen: Iterable[str], lora: dict[str, tuple[float, float]]
                    ) -> float:
    """Active weights whose weight-gradient GEMM GradES removes: named base matrices (without
    LoRA) or adapter halves (``...q_proj.lora_A...``: ``r * in``; ``lora_B``: ``out * r``)."""
    total, seen = 0.0, set()
    for f in frozen:
        if not isinstance(f, str):
            raise TypeError(f"frozen matrix names must be strings, got {type(f).__name__}")
        n = _norm_name(f)
        half = re.search(r"\.lora_([AB])(\.|$)", n)
        if half:
            base = n[:half.start()]
            if base not in lora:
                raise ValueError(f"{f!r} names an adapter on {base!r}, which has none here"
                                 + ("" if lora else " (give lora= the LoraConfig to count adapters)"))
            key = (base, half.group(1))
        elif n in active:
            key = (n, "")
        else:
            raise ValueError(f"unknown matrix {f!r}; expected names like {next(iter(active))!r}")
        if key not in seen:
            seen.add(key)
            if key[1]:
                total += lora[key[0]][0 if key[1] == "A" else 1]
            elif not lora:  # with LoRA every base matrix is frozen already
                total += active[n]
    return total


def training_flops(config, tokens: float, *, seq_len: int | None = None,
                   frozen: Iterable[str] = (), lora=None) -> float:
    """Training FLOPs for ``tokens`` tokens (forward + backward).

    Args:
        config: a transformers decoder config (or :class:`ModelShape`).
        tokens: tokens processed (every position of every sequence, prompt included).
        seq_len: sequence length for the causal attention term; None leaves attention out.
        frozen: names of frozen matrices (keys of :func:`matrix_shapes`, ``.weight`` optional), or
            with ``lora`` of adapter weights (``...q_proj.lora_A.default.weight``).
        lora: a PEFT ``LoraConfig`` or :class:`LoraSpec`; None for full fine-tuning.
    Returns:
        ``tokens * (6 N_trainable + 4 N_frozen + 12 L heads head_dim (seq_len+1)/2)`` FLOPs with
        ``N`` the active weights (:func:`active_weights`); with LoRA the base is frozen and each
        adapter adds ``6 r (in + out)``, less ``2 r in`` / ``2 r out`` per frozen A / B.
    Raises:
        ValueError, TypeError: bad counts, unknown matrix names, a LoRA setup not covered.
    """
    tokens = check_number(tokens, "tokens", lo=0.0)
    if not tokens.is_integer():  # a count of tokens; 1e9 as a float is one
        raise ValueError(f"tokens must be a whole number, got {tokens!r}")
    if seq_len is not None:
        seq_len = check_number(seq_len, "seq_len", lo=1, integer=True)
    per_token = _per_token(config, frozen, _lora(lora))
    if seq_len is not None:
        s = model_shape(config)
        per_token += 3.0 * 4.0 * s.layers * s.heads * s.head_dim * (seq_len + 1) / 2.0
    return tokens * per_token


def _per_token(config, frozen: Iterable[str], lora: LoraSpec | None) -> float:
    """Matrix FLOPs of one training token (no attention term)."""
    shapes = _matrices(config)
    active = {name: o * i * frac for name, (o, i, frac) in shapes.items()}
    n_all = sum(active.values())
    adapters: dict[str, tuple[float, float]] = {}
    if lora is not None:
        for name in _lora_targets(lora, shapes):
            o, i, _ = shapes[name]
            adapters[name] = (float(lora.r * i), float(lora.r * o))
    n_frozen = _frozen_weights(active, frozen, adapters)
    if lora is None:
        return 6.0 * (n_all - n_frozen) + 4.0 * n_frozen
    return 4.0 * n_all + 6.0 * sum(a + b for a, b in adapters.values()) - 2.0 * n_frozen


def inference_flops_per_token(config, context_len: int) -> float:
    """FLOPs of generating one token with a KV cache over ``context_len`` positions:
    ``2 N + 4 L heads head_dim context_len``."""
    context_len = check_number(context_len, "context_len", lo=0, integer=True)
    s = model_shape(config)
    n_all = sum(active_weights(config).values())
    return 2.0 * n_all + 4.0 * s.layers * s.heads * s.head_dim * context_len


def inference_flops_per_sample(config, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of one sampled completion of ``new_tokens`` generated tokens, as ``generate()`` runs it.

    The prefill is one causal forward over the ``prompt_len`` prompt tokens whose last position
    yields the first new token (the LM head runs at that position only, as transformers'
    ``generate`` does with ``logits_to_keep=1``); each further token needs one decoding forward of
    the token before it, so ``new_tokens`` tokens take ``new_tokens - 1`` decoding steps, the i-th
    attending to ``prompt_len + i`` positions. With ``N`` the counted weights of which ``N_head``
    in the LM head::

        2 (N - N_head) (prompt_len + new_tokens - 1) + 2 N_head new_tokens
        + 4 L heads head_dim (prompt_len (prompt_len + 1) / 2 + sum_{i=1}^{new_tokens-1} (prompt_len + i))

    ``new_tokens`` counts every generated token, an ``<eos>`` included.
    """
    prompt_len = check_number(prompt_len, "prompt_len", lo=1, integer=True)
    new_tokens = check_number(new_tokens, "new_tokens", lo=1, integer=True)
    s = model_shape(config)
    active = active_weights(config)
    n_head = active["lm_head"]
    n_body = sum(active.values()) - n_head
    att = 4.0 * s.layers * s.heads * s.head_dim
    steps = new_tokens - 1
    dense = 2.0 * n_body * (prompt_len + steps) + 2.0 * n_head * new_tokens
    attn = att * (prompt_len * (prompt_len + 1) / 2.0 + steps * prompt_len + steps * (steps + 1) / 2.0)
    return dense + attn


@dataclass
class FlopLedger:
    """Running account of training FLOPs with GradES freezing, and the TTC savings on top.

    Call :meth:`add_step` once per optimizer step with the tokens of that step and the matrices
    frozen during it. ``train_flops`` is what was spent; ``dense_flops`` what the same steps cost
    with nothing frozen. :meth:`summary` splits the saving against a planned full run into the
    GradES part (``dense_flops - train_flops``) and the early-stopping part
    (``planned - dense_flops``), which add up to ``planned - train_flops``.

    Args:
        config: the model's transformers config.
        seq_len: sequence length for the attention term (None: attention not counted).
        lora: a PEFT ``LoraConfig`` or :class:`LoraSpec` for LoRA training (then ``dense_flops``
            is the same LoRA steps with no adapter weight frozen).
    """

    config: object
    seq_len: int | None = None
    train_flops: float = 0.0
    dense_flops: float = 0.0
    eval_flops: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)
    lora: object | None = None

    def __post_init__(self) -> None:
        model_shape(self.config)  # refuse an unusable config now, not at the first step
        self.lora = _lora(self.lora)
        if self.seq_len is not None:
            self.seq_len = check_number(self.seq_len, "seq_len", lo=1, integer=True)

    def add_step(self, tokens: float, frozen: Iterable[str] = ()) -> float:
        """Account one step of ``tokens`` tokens with ``frozen`` matrices; returns its FLOPs."""
        f = training_flops(self.config, tokens, seq_len=self.seq_len, frozen=frozen, lora=self.lora)
        self.train_flops += f
        self.dense_flops += training_flops(self.config, tokens, seq_len=self.seq_len, lora=self.lora)
        self.steps += 1
        self.tokens += float(tokens)
        self.history.append((self.steps, self.train_flops))
        return f

    def add_eval(self, flops: float) -> None:
        """Account evaluation compute (e.g. TTC sampling) separately from training."""
        self.eval_flops += check_number(flops, "flops", lo=0.0)

    def state_dict(self) -> dict:
        """The running totals as a JSON-serialisable dict (``seq_len``, ``train_flops``,
        ``dense_flops``, ``eval_flops``, ``steps``, ``tokens``, ``history`` as ``[step, flops]``
        pairs), for :meth:`load_state_dict` when training resumes."""
        return {"seq_len": self.seq_len, "train_flops": self.train_flops, "dense_flops": self.dense_flops,
                "eval_flops": self.eval_flops, "steps": self.steps, "tokens": self.tokens,
                "history": [[s, f] for s, f in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the totals of :meth:`state_dict`. The ledger's ``seq_len`` must be the one they
        were counted with (``ValueError`` otherwise); nothing changes when a value is refused."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from FlopLedger.state_dict(), got {type(state).__name__}")
        keys = ("seq_len", "train_flops", "dense_flops", "eval_flops", "steps", "tokens", "history")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"FlopLedger state lacks {missing}")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"FlopLedger state was counted with seq_len={state['seq_len']!r}, "
                             f"this ledger has seq_len={self.seq_len!r}")
        vals = {k: check_number(state[k], f"FlopLedger state {k}", lo=0.0)
                for k in ("train_flops", "dense_flops", "eval_flops", "tokens")}
        steps = check_number(state["steps"], "FlopLedger state steps", lo=0, integer=True)
        if vals["train_flops"] > vals["dense_flops"]:
            raise ValueError("FlopLedger state: train_flops exceeds dense_flops")
        hist = state["history"]
        if not isinstance(hist, list):
            raise TypeError("FlopLedger state: history must be a list of [step, flops] pairs")
        history = []
        for i, pair in enumerate(hist):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"FlopLedger state: history[{i}] must be a [step, flops] pair")
            history.append((check_number(pair[0], f"FlopLedger state history[{i}] step", lo=0, integer=True),
                            check_number(pair[1], f"FlopLedger state history[{i}] flops", lo=0.0)))
        self.train_flops, self.dense_flops = vals["train_flops"], vals["dense_flops"]
        self.eval_flops, self.tokens, self.steps, self.history = vals["eval_flops"], vals["tokens"], steps, history

    def summary(self, planned_tokens: float | None = None) -> dict[str, float | None]:
        """FLOPs spent and saved; ``planned_tokens`` is the token count of the full planned run."""
        out: dict[str, float | None] = {
            "steps": float(self.steps), "tokens": self.tokens, "train_flops": self.train_flops,
            "dense_flops": self.dense_flops, "grades_saved": self.dense_flops - self.train_flops,
            "eval_flops": self.eval_flops, "planned_flops": None, "early_stop_saved": None,
            "total_saved": None}
        if planned_tokens is not None:
            planned = training_flops(self.config, planned_tokens, seq_len=self.seq_len, lora=self.lora)
            out["planned_flops"] = planned
            out["early_stop_saved"] = planned - self.dense_flops
            out["total_saved"] = planned - self.train_flops
        return out
