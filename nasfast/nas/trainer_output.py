"""What ``nasfast finetune`` prints while transformers' Trainer runs: its progress bars, and one line
per dev evaluation instead of every log dict."""
from __future__ import annotations

from typing import Optional


def one_line_per_evaluation(trainer, seed: int) -> None:
    """Trainer prints every log dict (``{'loss': ..., 'grad_norm': ...}``) to stdout, a flood over a long
    run; keep its progress bars, drop those dicts, and print one line per dev evaluation instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class Bars(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    class EvalLines(TrainerCallback):
        def __init__(self, bars: Optional[Bars]):
            self.bars = bars

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not (state.is_world_process_zero and metrics and "eval_accuracy" in metrics):
                return  # the final dev/test evaluations are reported once per seed by the caller
            line = f"seed {seed} step {state.global_step}/{state.max_steps}: dev accuracy {metrics['eval_accuracy']:.4f}"
            bar = self.bars.training_bar if self.bars is not None else None
            if bar is None:
                print(line, flush=True)
            else:
                bar.write(line)  # above the progress bar, not through it

    trainer.remove_callback(PrinterCallback)
    bars = Bars() if trainer.pop_callback(ProgressCallback) is not None else None
    if bars is not None:
        trainer.add_callback(bars)
    trainer.add_callback(EvalLines(bars))
