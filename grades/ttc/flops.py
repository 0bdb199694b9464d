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
* **Inference.** A generated token with a KV cache over ``c`` context positions (itself included)
  costs ``2 N + 4 * L * heads * head_dim * c``; a whole sample is counted by
  :func:`inference_flops_per_sample`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

__all__ = ["ModelShape", "model_shape", "matrix_shapes", "training_flops", "inference_flops_per_token",
           "inference_flops_per_sample", "FlopLedger"]


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


def model_shape(config) -> ModelShape:
    """Read a dense decoder config (``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``, ...)."""
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
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise TypeError("mixture-of-experts configs are not supported by this FLOP count")
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    for name, v in (("hidden_size", h), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                    ("intermediate_size", inter), ("vocab_size", vocab), ("head_dim", hd)):
        if v < 1:
            raise ValueError(f"config.{name} must be >= 1, got {v}")
    return ModelShape(h, layers, heads, int(kv), int(hd), inter, vocab)


def matrix_shapes(config) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of every counted matrix, named as in
    transformers' Llama/Qwen modules (``model.layers.0.self_attn.q_proj``, ..., ``lm_head``)."""
    s = model_shape(config)
    out: dict[str, tuple[int, int]] = {}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj"] = (s.heads * s.head_dim, s.hidden)
        out[p + "self_attn.k_proj"] = (s.kv_heads * s.head_dim, s.hidden)
        out[p + "self_attn.v_proj"] = (s.kv_heads * s.head_dim, s.hidden)
        out[p + "self_attn.o_proj"] = (s.hidden, s.heads * s.head_dim)
        out[p + "mlp.gate_proj"] = (s.intermediate, s.hidden)
        out[p + "mlp.up_proj"] = (s.intermediate, s.hidden)
        out[p + "mlp.down_proj"] = (s.hidden, s.intermediate)
    out["lm_head"] = (s.vocab, s.hidden)
    return out


def _norm_name(name: str) -> str:
    """Module name as in :func:`matrix_shapes`: drops a ``.weight`` suffix and a PEFT
    ``base_model.model.`` prefix (GradES component names of full fine-tuning match directly)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name[:-len(".weight")] if name.endswith(".weight") else name


def _frozen_params(shapes: dict[str, tuple[int, int]], frozen: Iterable[str]) -> int:
    total = 0
    seen = set()
    for f in frozen:
        if not isinstance(f, str):
            raise TypeError(f"frozen matrix names must be strings, got {type(f).__name__}")
        n = _norm_name(f)
        if n not in shapes:
            raise ValueError(f"unknown matrix {f!r}; expected names like {next(iter(shapes))!r} "
                             "(LoRA adapter weights are not counted by this dense FLOP model)")
        if n not in seen:
            seen.add(n)
            o, i = shapes[n]
            total += o * i
    return total


def _check_count(v, name: str, *, whole: bool = False, positive: bool = False) -> float:
    """``v`` (a Python or numpy real, not a bool) as a finite float ``>= 0`` (``> 0`` when
    ``positive``); a whole number when ``whole``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not (f > 0 if positive else f >= 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {v!r}")
    if whole and not f.is_integer():
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return f


def _check_int(v, name: str, lo: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def training_flops(config, tokens: float, *, seq_len: int | None = None,
                   frozen: Iterable[str] = ()) -> float:
    """Training FLOPs for ``tokens`` tokens (forward + backward).

    Args:
        config: a transformers decoder config (or :class:`ModelShape`).
        tokens: tokens processed (every position of every sequence, prompt included).
        seq_len: sequence length for the causal attention term; None leaves attention out.
        frozen: names of frozen matrices (keys of :func:`matrix_shapes`, ``.weight`` optional).
    Returns:
        ``tokens * (6 N_trainable + 4 N_frozen + 12 L heads head_dim (seq_len+1)/2)`` FLOPs.
    """
    tokens = _check_count(tokens, "tokens", whole=True)
    if seq_len is not None:
        seq_len = _check_int(seq_len, "seq_len", 1)
    shapes = matrix_shapes(config)
    s = model_shape(config)
    n_all = sum(o * i for o, i in shapes.values())
    n_frozen = _frozen_params(shapes, frozen)
    per_token = 6.0 * (n_all - n_frozen) + 4.0 * n_frozen
    if seq_len is not None:
        per_token += 3.0 * 4.0 * s.layers * s.heads * s.head_dim * (seq_len + 1) / 2.0
    return tokens * per_token


def inference_flops_per_token(config, context_len: int) -> float:
    """FLOPs of generating one token with a KV cache over ``context_len`` positions:
    ``2 N + 4 L heads head_dim context_len``."""
    context_len = _check_int(context_len, "context_len", 0)
    s = model_shape(config)
    n_all = sum(o * i for o, i in matrix_shapes(config).values())
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
    prompt_len = _check_int(prompt_len, "prompt_len", 1)
    new_tokens = _check_int(new_tokens, "new_tokens", 1)
    s = model_shape(config)
    shapes = matrix_shapes(config)
    n_head = shapes["lm_head"][0] * shapes["lm_head"][1]
    n_body = sum(o * i for o, i in shapes.values()) - n_head
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
    """

    config: object
    seq_len: int | None = None
    train_flops: float = 0.0
    dense_flops: float = 0.0
    eval_flops: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        model_shape(self.config)  # refuse an unusable config now, not at the first step
        if self.seq_len is not None:
            self.seq_len = _check_int(self.seq_len, "seq_len", 1)

    def add_step(self, tokens: float, frozen: Iterable[str] = ()) -> float:
        """Account one step of ``tokens`` tokens with ``frozen`` matrices; returns its FLOPs."""
        f = training_flops(self.config, tokens, seq_len=self.seq_len, frozen=frozen)
        self.train_flops += f
        self.dense_flops += training_flops(self.config, tokens, seq_len=self.seq_len)
        self.steps += 1
        self.tokens += float(tokens)
        self.history.append((self.steps, self.train_flops))
        return f

    def add_eval(self, flops: float) -> None:
        """Account evaluation compute (e.g. TTC sampling) separately from training."""
        self.eval_flops += _check_count(flops, "flops")

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
        vals = {k: _check_count(state[k], f"FlopLedger state {k}")
                for k in ("train_flops", "dense_flops", "eval_flops", "tokens")}
        steps = _check_int(state["steps"], "FlopLedger state steps", 0)
        if vals["train_flops"] > vals["dense_flops"]:
            raise ValueError("FlopLedger state: train_flops exceeds dense_flops")
        hist = state["history"]
        if not isinstance(hist, list):
            raise TypeError("FlopLedger state: history must be a list of [step, flops] pairs")
        history = []
        for i, pair in enumerate(hist):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"FlopLedger state: history[{i}] must be a [step, flops] pair")
            history.append((_check_int(pair[0], f"FlopLedger state history[{i}] step", 0),
                            _check_count(pair[1], f"FlopLedger state history[{i}] flops")))
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
            planned = training_flops(self.config, planned_tokens, seq_len=self.seq_len)
            out["planned_flops"] = planned
            out["early_stop_saved"] = planned - self.dense_flops
            out["total_saved"] = planned - self.train_flops
        return out
