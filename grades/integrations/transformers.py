"""``GradESCallback``: GradES for the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``).

Usage::

    from grades import GradESConfig
    from grades.integrations.transformers import GradESCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradESCallback(GradESConfig(rel_tau=0.5))])
    trainer.train()

The callback builds a :class:`~grades.GradES` at ``on_train_begin`` (``total_steps`` taken from
``state.max_steps`` unless set), and steps it in ``on_optimizer_step``, i.e. once per optimizer
step, on the accumulated gradient, before ``zero_grad``. With ``max_grad_norm`` clipping the
statistics are those of the *unclipped* gradient: the callback records the total norm the
Trainer's ``accelerator.clip_grad_norm_`` returns and divides the clip coefficient out (on the
device), since one global-norm coefficient would otherwise move every matrix when one spikes.
It works with the Trainer's own optimizer or with a :class:`~grades.FrozenAwareAdamW` passed as
``optimizers=(opt, sched)`` (statistics then come from the optimizer's fused pass, and freezes
act on its device mask at once; the total gradient norm the Trainer computes anyway then
serves as the optimizer's non-finite check, :meth:`~grades.FrozenAwareAdamW.use_total_norm`, so
a non-finite norm skips the step under its default ``nonfinite="auto"``).

It adds ``grades/frozen_fraction`` and ``grades/<type>_stat`` (mean statistic of the non-frozen
components of each type) to the Trainer's logs. The Trainer calls reporting callbacks
(TensorBoard, W&B, ...) before user callbacks, so the callback moves itself to the front of the
Trainer's callback list (:meth:`GradESCallback.attach`, done automatically when the Trainer that
runs it can be found) and also completes ``state.log_history``. It sets
``control.should_training_stop`` once the policy says stop, writes the history JSON into
``args.output_dir`` at the end of training, and saves its state in each checkpoint's
``trainer_state.json`` (the Trainer's ``ExportableState`` mechanism), from which it is restored
when training resumes from that checkpoint, wherever it lies.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Mapping, Optional

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..policy import GradES, GradESConfig

HISTORY_FILE = "grades_history.json"
TRAINER_STATE = "trainer_state.json"


def _calling_trainer(depth: int = 8) -> Optional[Trainer]:
    """The ``Trainer`` on the call stack above a callback event (``Trainer`` -> its callback
    handler -> the callback), or ``None``."""
    f = sys._getframe(2)
    for _ in range(depth):
        if f is None:
            return None
        obj = f.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        f = f.f_back
    return None


def _record_clip_norm(accelerator: Any) -> None:
    """Wrap ``accelerator.clip_grad_norm_`` (on this instance) so that it keeps the total norm
    it returns, and the ``max_norm`` it clipped to, in ``clip_grad_norm_.last``."""
    if hasattr(accelerator.clip_grad_norm_, "last"):
        return
    inner = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        total = inner(parameters, max_norm, *args, **kwargs)
        clip_grad_norm_.last = (total, max_norm)
        return total
    clip_grad_norm_.last = None
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _attach_wrapper(trainer: Optional[Trainer], gs: GradES) -> None:
    """Under ``torchrun`` the Trainer trains a DDP wrapper of the model (``find_unused_parameters``
    off with gradient checkpointing): GradES keeps ``requires_grad`` and stops communicating
    frozen gradients through DDP's comm hook instead (:func:`~grades.integrations.ddp.attach_ddp`)."""
    from torch.nn.parallel import DistributedDataParallel
    wrapped = getattr(trainer, "model_wrapped", None)
    if isinstance(wrapped, DistributedDataParallel) and gs.autograd_gate is None:
        from .ddp import attach_ddp
        attach_ddp(wrapped, gs)


class GradESCallback(TrainerCallback, ExportableState):
    """Trainer callback running the GradES policy.

    Args:
        config: the :class:`~grades.GradESConfig` (default: automatic thresholds), or its
            ``to_dict()`` form.
        components: passed to :class:`~grades.GradES` (``None``: default discovery).
        history_file: file name of the history JSON written into ``args.output_dir`` at the end
            of training (``None``: do not write).
        resume_from: restore the GradES state explicitly from a checkpoint folder (its
            ``trainer_state.json``) or a JSON file of :meth:`GradES.state_dict`. By default the
            state is taken from the checkpoint the Trainer resumes from; without one there,
            a resumed run warns and starts GradES afresh at the resume step
            (:meth:`GradES.fast_forward`).

    With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces this instance by
    one rebuilt from its saved arguments (config and history file), which then continues the
    same way.
    """

    def __init__(self, config: Optional[GradESConfig] = None, *, components: Any = None,
                 history_file: Optional[str] = HISTORY_FILE, resume_from: Optional[str] = None):
        if config is None:
            config = GradESConfig()
        elif isinstance(config, Mapping):
            config = GradESConfig(**config)
        if not isinstance(config, GradESConfig):
            raise TypeError(f"config must be a GradESConfig, got {type(config).__name__}")
        self.config = config
        self.components = components
        self.history_file = history_file
        self.resume_from = resume_from
        self.gs: Optional[GradES] = None
        self.trainer: Optional[Trainer] = None
        self._warned_clip = False

    # ------------------------------------------------------------------ binding

    def attach(self, trainer: Trainer) -> "GradESCallback":
        """Bind to ``trainer``: put this callback first in its callback list (reporters then see
        the metrics it adds to the logs) and record the total gradient norm its accelerator
        clips with (statistics of the unclipped gradient). Done automatically when the callback
        is passed to ``Trainer(callbacks=...)`` or ``add_callback``; returns ``self``."""
        cbs = trainer.callback_handler.callbacks
        # slice assignment keeps the positions of the callbacks after this one, so an event loop
        # iterating over the list while this runs visits every callback exactly once
        cbs[:] = [self] + [c for c in cbs if c is not self]
        acc = getattr(trainer, "accelerator", None)
        if acc is not None and callable(getattr(acc, "clip_grad_norm_", None)):
            _record_clip_norm(acc)
        self.trainer = trainer
        return self

    def _bind(self) -> None:
        trainer = _calling_trainer()
        if trainer is not None and (self.trainer is not trainer or trainer.callback_handler.callbacks[0] is not self):
            self.attach(trainer)

    def _recorded_clip(self) -> tuple[Any, Optional[tuple]]:
        """The accelerator's recording ``clip_grad_norm_`` and its ``(total_norm, max_norm)`` of
        this step (``None`` when nothing was recorded)."""
        clip = getattr(getattr(self.trainer, "accelerator", None), "clip_grad_norm_", None)
        return clip, getattr(clip, "last", None)

    def _clip(self, args) -> tuple[Any, Optional[float]]:
        """``(total_norm, max_norm)`` of this step's gradient clipping, or ``(None, None)``;
        consumes the recorded value."""
        clip, last = self._recorded_clip()
        if last is None:
            if args.max_grad_norm and args.max_grad_norm > 0 and not self._warned_clip:
                self._warned_clip = True
                warnings.warn("GradESCallback could not see the gradient clipping of this Trainer, so its statistics "
                              "are of the clipped gradient; call GradESCallback.attach(trainer) before training",
                              RuntimeWarning, stacklevel=3)
            return None, None
        clip.last = None
        total, max_norm = last
        max_norm = float(max_norm)
        if total is None or not (0 < max_norm < float("inf")):
            return None, None
        return total, max_norm

    # ------------------------------------------------------------------ lifecycle

    def on_init_end(self, args, state, control, **kwargs):
        self._bind()
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("GradESCallback needs the Trainer to pass the model to its callbacks")
        self._bind()
        cfg = self.config
        if cfg.total_steps is None and state.max_steps and state.max_steps > 0:
            cfg = dataclasses.replace(cfg, total_steps=int(state.max_steps))  # checks grace_steps < max_steps
        components = self.components
        same_model = self.gs is not None and self.gs.model is model
        if components is None and same_model:
            components = self.gs.components  # same model again: keep the components already frozen
        self.gs = GradES(model, optimizer, cfg, components=components)
        _attach_wrapper(self.trainer, self.gs)
        saved = self._saved_state(state)
        if saved is None and same_model:
            # a fresh start on a model an earlier run froze matrices of: give them back their
            # requires_grad (loading a state does this itself)
            self.gs.load_state_dict(self.gs.state_dict())
        if state.stateful_callbacks is not None:
            # a checkpoint written without this callback has no entry, and the Trainer's next
            # checkpoint save expects one for every ExportableState callback
            state.stateful_callbacks.setdefault(type(self).__name__, {"args": {}, "attributes": {}})
        if saved is not None:
            self.gs.load_state_dict(saved)
        elif state.global_step > 0:
            warnings.warn(f"GradESCallback: training resumes at step {state.global_step} but the checkpoint holds "
                          "no GradES state (it was saved without this callback, or "
                          f"{TRAINER_STATE} was replaced), so GradES starts afresh there: nothing is frozen "
                          "and patience counts restart; pass resume_from=... to restore a saved state",
                          RuntimeWarning, stacklevel=2)
            self.gs.fast_forward(state.global_step)
        if self.gs.should_stop:
            control.should_training_stop = True
        return control

    def _saved_state(self, state) -> Optional[dict]:
        if self.resume_from is not None:
            p = self.resume_from
            p = os.path.join(p, TRAINER_STATE) if os.path.isdir(p) else p
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no GradES state at {p}")
            with open(p) as f:
                d = json.load(f)
            sd = self._from_trainer_state(d.get("stateful_callbacks", {})) if "stateful_callbacks" in d else d
            if sd is None:
                raise ValueError(f"{p} holds no GradES state")
            return sd
        if state.global_step > 0:
            sd = self._from_trainer_state(state.stateful_callbacks or {})
            if sd is not None and sd.get("step") == state.global_step:
                return sd
        return None

    def _from_trainer_state(self, stateful: Mapping) -> Optional[dict]:
        entry = stateful.get(type(self).__name__)
        for e in entry if isinstance(entry, list) else [entry]:
            sd = (e or {}).get("attributes", {}).get("grades_state")
            if sd is not None:
                return sd
        return None

    def state(self) -> dict:
        """``ExportableState``: what the Trainer stores in a checkpoint's ``trainer_state.json``
        (the arguments to rebuild this callback and the GradES state; a host sync)."""
        return {"args": {"config": self.config.to_dict(), "history_file": self.history_file},
                "attributes": {"grades_state": self.gs.state_dict() if self.gs is not None else None}}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The Trainer has just computed the total gradient norm (it always does, clipping or
        # not): a FrozenAwareAdamW takes it as this step's non-finite check and reads each
        # gradient once instead of twice.
        gs = self.gs
        if gs is not None and gs.frozen_aware and getattr(gs.optimizer, "uses_total_norm", False):
            _, last = self._recorded_clip()
            if last is not None and last[0] is not None and hasattr(gs.optimizer, "use_total_norm"):
                gs.optimizer.use_total_norm(last[0])
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.gs is None:
            return control
        total, max_norm = self._clip(args)
        self.gs.step(total_norm=total, max_norm=max_norm)
        if self.gs.should_stop:
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.gs is not None:
            self.gs.poll()
            if self.gs.should_stop:
                self._stop(args, state, control)
        return control

    def _stop(self, args, state, control) -> None:
        """Stop training; the first time, say so in one line and have the Trainer save a
        checkpoint of the stopped model (unless it saves none: ``save_strategy="no"``)."""
        control.should_training_stop = True
        if getattr(self, "_stop_announced", False):
            return
        self._stop_announced = True
        save = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        if save:
            control.should_save = True
        if state.is_world_process_zero:
            frozen, n = len(self.gs.frozen_components), self.gs.num_components
            which = f"all {n}" if frozen == n else f"{frozen} of {n}"
            print(f"GradES: {which} matrices frozen at step {state.global_step}; stopping"
                  + (f" (checkpoint-{state.global_step} saved in {args.output_dir})" if save else ""),
                  file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.gs is None or logs is None:
            return control
        metrics = {"grades/frozen_fraction": round(self.gs.frozen_fraction, 6)}
        for typ, v in self.gs.type_means().items():
            metrics[f"grades/{typ}_stat"] = v
        logs.update(metrics)
        # Trainer.log appends a copy of the logs to the history before calling on_log
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(k in last for k in logs if k not in metrics):
            last.update(metrics)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.gs is None:
            return control
        self.gs.wait()
        if self.history_file and args.should_save:
            self.gs.save_history(os.path.join(args.output_dir, self.history_file))
        return control


__all__ = ["GradESCallback", "HISTORY_FILE"]
