"""``GradESCallback``: GradES for the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``).

Usage::

    from grades import GradESConfig
    from grades.integrations.transformers import GradESCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradESCallback(GradESConfig(rel_tau=0.5))])
    trainer.train()

The callback builds a :class:`~grades.GradES` at ``on_train_begin`` (``total_steps`` taken from
``state.max_steps`` unless set), and steps it in ``on_optimizer_step``, i.e. once per optimizer
step, on the accumulated and clipped gradient, before ``zero_grad``. It works with the Trainer's
own optimizer or with a :class:`~grades.FrozenAwareAdamW` passed as ``optimizers=(opt, sched)``
(statistics then come from the optimizer's fused pass, and freezes act on its device mask at once).

It adds ``grades/frozen_fraction`` and ``grades/<type>_stat`` (mean statistic of the non-frozen
components of each type) to the Trainer's logs, sets ``control.should_training_stop`` once the
policy says stop, writes the history JSON into ``args.output_dir`` at the end of training, and
saves its state into each checkpoint folder, from which it is restored when training resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from transformers import TrainerCallback

from ..policy import GradES, GradESConfig

STATE_FILE = "grades_state.json"
HISTORY_FILE = "grades_history.json"


class GradESCallback(TrainerCallback):
    """Trainer callback running the GradES policy.

    Args:
        config: the :class:`~grades.GradESConfig` (default: automatic thresholds).
        components: passed to :class:`~grades.GradES` (``None``: default discovery).
        history_file: file name of the history JSON written into ``args.output_dir`` at the end
            of training (``None``: do not write).
        resume_from: a checkpoint folder (or state file) to restore from explicitly; by default
            the state is looked up in ``<output_dir>/checkpoint-<global_step>`` when the Trainer
            resumes.
    """

    def __init__(self, config: Optional[GradESConfig] = None, *, components: Any = None,
                 history_file: Optional[str] = HISTORY_FILE, resume_from: Optional[str] = None):
        if config is None:
            config = GradESConfig()
        if not isinstance(config, GradESConfig):
            raise TypeError(f"config must be a GradESConfig, got {type(config).__name__}")
        self.config = config
        self.components = components
        self.history_file = history_file
        self.resume_from = resume_from
        self.gs: Optional[GradES] = None

    # ------------------------------------------------------------------ lifecycle

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("GradESCallback needs the Trainer to pass the model to its callbacks")
        cfg = self.config
        if cfg.total_steps is None and cfg.grace_steps is None and state.max_steps and state.max_steps > 0:
            cfg = dataclasses.replace(cfg, total_steps=int(state.max_steps))
        components = self.components
        if components is None and self.gs is not None and self.gs.model is model:
            components = self.gs.components  # same model again: keep the components already frozen
        self.gs = GradES(model, optimizer, cfg, components=components)
        path = self._resume_path(args, state)
        if path is not None:
            with open(path) as f:
                self.gs.load_state_dict(json.load(f))
        if self.gs.should_stop:
            control.should_training_stop = True
        return control

    def _resume_path(self, args, state) -> Optional[str]:
        if self.resume_from is not None:
            p = self.resume_from
            p = os.path.join(p, STATE_FILE) if os.path.isdir(p) else p
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no GradES state at {p}")
            return p
        if state.global_step > 0:
            p = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.isfile(p):
                return p
        return None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.gs is None:
            return control
        self.gs.step()
        if self.gs.should_stop:
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.gs is not None:
            self.gs.poll()
            if self.gs.should_stop:
                control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.gs is None or logs is None:
            return control
        logs["grades/frozen_fraction"] = round(self.gs.frozen_fraction, 6)
        for typ, v in self.gs.type_means().items():
            logs[f"grades/{typ}_stat"] = v
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.gs is None or not args.should_save:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.gs.state_dict(), f)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.gs is None:
            return control
        self.gs.wait()
        if self.history_file and args.should_save:
            self.gs.save_history(os.path.join(args.output_dir, self.history_file))
        return control


__all__ = ["GradESCallback", "STATE_FILE", "HISTORY_FILE"]
