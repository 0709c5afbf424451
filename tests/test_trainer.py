"""The trainer's parts: TrainState against what checkpoints carry, and the metrics sinks trackers would attach to."""

import json

import pytest

from conftest import StopAfter, micro_config
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.state import TrainState
from hybridctl.core.training.trainer import Trainer

# What state.json holds besides the TrainState: the run's context, and what save_checkpoint adds.
RUN_CONTEXT_KEYS = {"config_hash", "data", "world_size", "config"}
CHECKPOINT_KEYS = {"format_version", "rng", "files"}


def test_checkpoint_state_is_the_train_state_and_the_run_context(finished_micro_run):
    state = json.loads((finished_micro_run / "checkpoints" / "step_000003" / ckpt.STATE_FILE).read_text())
    train_state = TrainState.from_dict(state)
    progress = train_state.to_dict()
    assert set(state) == set(progress) | RUN_CONTEXT_KEYS | CHECKPOINT_KEYS
    assert progress == {key: state[key] for key in progress}  # read back unchanged
    assert train_state.step == 3 and train_state.prior_time_s == state["train_time_s"] > 0


def test_older_checkpoint_state_gets_the_defaults(finished_micro_run):
    state = json.loads((finished_micro_run / "checkpoints" / "step_000003" / ckpt.STATE_FILE).read_text())
    older = {key: state[key] for key in ("step", "schedule")}  # the keys every version has written
    train_state = TrainState.from_dict(older)
    assert (train_state.tokens, train_state.best_step, train_state.skipped_steps, train_state.bad_in_row) == (0, -1, 0, 0)
    assert train_state.best_val_loss == float("inf") and train_state.train_time_s == 0.0
    assert train_state.wall_time_s is None  # unknown: summary.json's wall time adds up as it did for these
    assert train_state.schedule(5) == TrainState.from_dict(state).schedule(5)


class Recorder:
    """A sink as an experiment tracker would be one."""

    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        self.records.append(dict(record))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("stop_at", [None, 3])
def test_an_attached_sink_gets_every_record_before_the_callback(tmp_path, stop_at):
    cfg = micro_config()
    run = RunDir(tmp_path / "r")
    run.create(cfg)
    sink, seen = Recorder(), []
    stop = StopAfter(stop_at) if stop_at else (lambda kind, record: None)

    def callback(kind, record):
        if kind in ("log", "eval"):
            assert sink.records and sink.records[-1] == record  # the sinks first, then the progress report
            seen.append(record)
        stop(kind, record)

    trainer = Trainer(cfg, run, callback=callback)
    trainer.metrics.sinks.append(sink)
    try:
        if stop_at:
            with pytest.raises(KeyboardInterrupt):
                trainer.fit()
        else:
            trainer.fit()
    finally:
        run.release_lock()
    assert sink.records == run.read_metrics() == seen
    assert max(r["step"] for r in sink.records) == (stop_at or cfg.train.steps)
    assert {"loss", "val_loss"} <= {key for r in sink.records for key in r}
    assert sink.closed  # also when the run ends by an exception
