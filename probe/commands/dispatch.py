"""One entry per command that the CLI and the Python API both call: `eval_command` picks the path `probe eval` takes
(fixed prompts, BEAR statements, ParaRel consistency, saved prompts on BEAR, PEFT adapters, a run's saved prompts),
`train_command` runs `probe train`. Each returns a `CommandResult`: what the CLI prints, and the runs themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from probe.commands.common import RunResult, results_text
from probe.options import Options


def run_report(run: RunResult) -> str:
    """What the CLI prints of a finished run: its results table, then where it is saved."""
    return (f"{results_text(run.results)}\n\nsaved {run.folder.root}/results.json, relations.csv, summary.md "
            f"({run.seconds:.1f}s in all)")


def consistency_report(run: RunResult) -> str:
    """What the CLI prints of a consistency run: the per-relation and macro tables, then where it is saved."""
    from probe.commands.consistency import consistency_tables

    per, macro = consistency_tables(run.results)
    return "\n".join([per.to_string(index=False, float_format=lambda v: f"{v:.2f}"),
                      "\nmacro (mean over relations where defined), in %:",
                      macro.to_string(index=False, float_format=lambda v: f"{v:.2f}"),
                      f"\nsaved {run.folder.root}/results.json, consistency.md, consistency.png "
                      f"({run.seconds:.1f}s in all)"])


@dataclass
class CommandResult:
    """A command's outcome: its runs (each printed by `report`), or, for paths that write no run folder, the `text`
    printed; `exit_code` 1 where a rerun's figures differ from the saved ones."""

    runs: list[RunResult] = field(default_factory=list)
    report: Callable[[RunResult], str] = run_report
    text: str | None = None
    exit_code: int = 0

    def lines(self) -> list[str]:
        """What the CLI prints, in order (a header per model when there are several runs)."""
        if self.text is not None:
            return [self.text]
        out = []
        for run in self.runs:
            if len(self.runs) > 1:
                out.append(f"\n== {run.results['config']['model']}")
            out.append(self.report(run))
        return out


def eval_command(opts: Options, log=print, loaded=None, consistency: bool = False) -> CommandResult:
    """`probe eval` from its flags, whichever path they ask for (`consistency`: --consistency; `loaded(data,
    candidates)`: the Python API's model, already loaded, for the fixed-prompt path)."""
    if consistency:
        from probe.commands.consistency import run_consistency

        return CommandResult(run_consistency(opts, log), consistency_report)
    if opts.prompts is None:
        from probe.commands.eval import run_eval

        return CommandResult(run_eval(opts, log, loaded))
    from probe.data import bear_folder
    from probe.peft_adapters import describe, eval_peft, is_peft_folder

    if opts.data is not None and bear_folder(Path(opts.data)) is not None:
        from probe.commands.bear_prompts import run_prompts_on_bear

        return CommandResult(run_prompts_on_bear(opts, log))  # prompts trained on LAMA, on BEAR's facts and answers
    if is_peft_folder(opts.prompts):  # PEFT prompt adapters (probe/peft_adapters.py)
        return CommandResult(text=describe(eval_peft(opts, log=log)))
    from probe.commands.rerun import rerun_prompts, rerun_table

    text, all_same = rerun_table(rerun_prompts(opts, log=log))
    return CommandResult(text=text, exit_code=0 if all_same else 1)


def train_command(opts: Options, log=print, loaded=None) -> CommandResult:
    """`probe train` from its flags (`loaded`: as in `eval_command`)."""
    from probe.commands.train import run_train

    return CommandResult(run_train(opts, log, loaded))
