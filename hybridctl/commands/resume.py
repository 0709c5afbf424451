"""`hybridctl resume`: continue a run from a checkpoint, optionally past its planned end (on several GPUs with
--gpus N, whatever number of processes wrote the checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hybridctl.commands.train import GPUS_HELP, check_config_for_gpus, check_gpus, launch_on_gpus
from hybridctl.core.config import Config, config_from_dict, config_keys, suggest_key
from hybridctl.core.errors import ConfigError, RunError
from hybridctl.core.lab.render import TrainProgress, summary_table
from hybridctl.core.lab.tables import console, err_console, print_table
from hybridctl.core.presets import apply_overrides, parse_override
from hybridctl.core.training.checkpoint_files import read_state, verify_checkpoint
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.tracking import check_trackers


# What `resume --set` may change: how the run is watched, saved and run, never its model, data or optimisation.
RESUMABLE_KEYS = (
    "train.eval_every", "train.save_every", "train.log_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.device", "train.compile", "train.loss", "train.grad_accum", "train.log_to", "train.wandb_mode",
)


def with_resume_overrides(cfg: Config, overrides: list[str]) -> Config:
    """The run's config with `--set` overrides of RESUMABLE_KEYS applied; any other key is refused in one line."""
    takes = f"resume --set takes {', '.join(k.split('.', 1)[1] for k in RESUMABLE_KEYS)} (as train.KEY)"
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in config_keys():  # a typo: no command takes it, so none is offered
            raise ConfigError(f"unknown key '{key}'{suggest_key(key)}; {takes}")
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"resume --set cannot change {key}: a resumed run keeps its model, data and optimisation; "
                f"{takes}, or start a new run with `hybridctl train --set {text}`"
            )
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


def check_not_diverged(run: RunDir, cfg: Config, from_: str) -> None:
    """A diverged run continued from its newest checkpoint would replay the same batches at the same LR (which
    resume keeps): refused, unless --from names an earlier checkpoint on purpose."""
    summary = run.read_summary()
    if summary.get("status") != "diverged" or from_ != "latest":
        return
    at = summary.get("diverged_at")
    where = f" at step {at}" if isinstance(at, int) else ""
    raise RunError(f"run {run.path} diverged{where}, and resuming keeps its LR ({cfg.train.lr:g}) and batches; train it "
                   "again with a lower train.lr and --force, or pick an earlier checkpoint with --from")


def resume(
    run_path: Path = typer.Argument(..., metavar="RUN", help="The run folder, e.g. runs/tiny."),
    extend_steps: int = typer.Option(
        0, "--extend-steps", metavar="N",
        help="Train N steps beyond the run's planned total. The LR continues from the value it had reached and "
             "follows a new cosine down to the same floor (lr * min_lr_ratio) at the new last step: no new warmup, "
             "no jump in LR.",
    ),
    from_: str = typer.Option("latest", "--from", metavar="CHECKPOINT", help="Checkpoint to continue from: latest, best, or step_000200."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help=f"Change a setting that leaves the model, data and optimisation alone, e.g. --set train.eval_every=100 (repeatable; keys: {', '.join(RESUMABLE_KEYS)})."),
    gpus: Optional[int] = typer.Option(None, "--gpus", metavar="N", help=GPUS_HELP),
    force: bool = typer.Option(
        False, "--force",
        help="Resume from an earlier checkpoint than the newest: deletes the checkpoints (and best/) saved after "
             "it, and the metrics logged after it.",
    ),
):
    """Continue a run from its newest (or a chosen) checkpoint."""
    if gpus is not None:
        check_gpus(gpus, "resume")
    if extend_steps < 0:
        raise RunError(f"--extend-steps must be >= 0, got {extend_steps}")
    run = RunDir(run_path)
    cfg = with_resume_overrides(run.load_config(), list(overrides))
    check_not_diverged(run, cfg, from_)
    check_trackers(cfg)
    if gpus is not None:
        check_config_for_gpus(cfg, gpus)
        if gpus > 1:
            run.acquire_lock()  # refused here, in one line, while another process writes the run
            run.release_lock()
            return launch_on_gpus(gpus)
    from hybridctl.core.training import distributed as dist  # torch: only once the run is to continue
    from hybridctl.core.training.steps import resolve_device
    from hybridctl.core.training.trainer import train as run_training

    with dist.session(resolve_device(cfg.train.device)):
        main = dist.is_main()
        checkpoint = step = None
        later = []  # what resuming abandons (rank 0 finds it, and alone deletes it)
        try:
            with dist.together():  # rank 0 locks the run, tidies it and picks the checkpoint; the others wait
                if main:
                    run.acquire_lock()
                    run.remove_partial_checkpoints()
                    skipped = lambda path, reason: err_console.print(f"warning: passing over {path.name}: {reason}", style="yellow", markup=False, soft_wrap=True)  # noqa: E731
                    checkpoint = run.resolve_checkpoint(from_, on_skip=skipped)
                    # Check the chosen checkpoint before anything is written ('latest' is checked as it is picked).
                    step = (read_state(checkpoint) if from_ == "latest" else verify_checkpoint(checkpoint))["step"]
                    # An earlier checkpoint than the newest starts the history again at `step`: the later ones would
                    # otherwise be picked by the next plain resume. Past 'latest' lie only damaged ones it passed over
                    # (the run writes over their names) and a best/ of the same course, which is kept.
                    later = run.checkpoints_after(step) if from_ != "latest" else []
                    if later and not force:
                        raise RunError(
                            f"{run.path} has checkpoints after {checkpoint.name} ({', '.join(p.name for p in later)}); resuming from it "
                            f"deletes them and the metrics after step {step}: pass --force to do so, or resume from latest"
                        )
            checkpoint = Path(dist.share_text(str(checkpoint) if main else ""))  # every process resumes from rank 0's pick
            with dist.together():
                if not main:
                    step = read_state(checkpoint)["step"]
                if extend_steps:
                    cfg.train.steps = max(cfg.train.steps, step) + extend_steps
                elif step >= cfg.train.steps:
                    raise RunError(f"run {run.path} already finished its {cfg.train.steps} steps; add --extend-steps N to train further")
                if main and (extend_steps or overrides):
                    run.write_config(cfg)  # the run goes on with these settings, and a later resume keeps them
            if main:
                console.print(f"resuming {run.path} from {checkpoint.name} (step {step}) to step {cfg.train.steps}")
            progress = TrainProgress(run.name) if main else None
            try:
                summary = run_training(cfg, run, resume_from=checkpoint, extend_steps=extend_steps, callback=progress,
                                       rollback=bool(later))
            finally:
                if progress is not None:
                    progress.close()
        finally:
            if main:
                run.release_lock()
    if main:
        print_table(summary_table(summary, title=f"Run summary: {run.path}"))
