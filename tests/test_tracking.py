"""Experiment trackers: TensorBoard event files read back with TensorBoard's own reader hold what metrics.jsonl and
summary.json hold (a real micro training run, and one resumed after a crash); wandb gets the same records; a
tracker that is not installed is refused in one line before anything is written."""

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from conftest import cli_args_for_micro, micro_config
from hybridctl.cli import main
from hybridctl.core.config import config_from_dict
from hybridctl.core.errors import ConfigError
from hybridctl.core.training import tracking
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.trainer import train

TB = ['train.log_to=["tensorboard"]']


pytestmark = pytest.mark.usefixtures("one_thread")


def train_tracked(cfg, run, resume_from=None, inner=None):
    """The trainer makes the sinks of train.log_to itself (for a resumed run, from its checkpoint's step on)."""
    try:
        return train(cfg, run, resume_from=resume_from, callback=inner)
    finally:
        run.release_lock()


def read_events(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run.path / tracking.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_events(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl and summary.json as the tracker should show them: <kind>/<key> -> [(step, value)]."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in run.read_metrics():
        kind = "eval" if "val_loss" in row else "train"
        for key, value in row.items():
            if key != "step":
                expected.setdefault(f"{kind}/{key}", []).append((row["step"], value))
    summary = run.read_summary()
    for key, value in tracking.scalars(summary).items():
        expected[f"summary/{key}"] = [(summary["steps"], value)]
    return expected


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag
        # event files hold 32-bit floats
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in points], rel=1e-6, abs=1e-30), tag


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tmp_path):
    cfg = micro_config(TB)
    run = RunDir(tmp_path / "runs" / "tracked")
    run.create(cfg)
    summary = train_tracked(cfg, run)
    got, expected = read_events(run), expected_events(run)
    assert {"train/loss", "train/lr", "train/tok_s", "eval/val_loss", "eval/val_ppl", "summary/best_val_loss"} <= set(got)
    assert_same(got, expected)
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert got["summary/final_val_loss"][0][1] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    # the tracker changes nothing in metrics.jsonl: the same lines as an untracked run of the same config
    plain = RunDir(tmp_path / "runs" / "plain")
    plain.create(micro_config())
    try:
        train(micro_config(), plain)
    finally:
        plain.release_lock()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tok_s"} for r in rows]  # noqa: E731  (timing)
    assert strip(run.read_metrics()) == strip(plain.read_metrics())
    assert not (plain.path / tracking.TENSORBOARD_DIR).exists()


def test_resumed_run_shows_each_step_once(tmp_path):
    """A crash after step 5 (checkpoint at 3): the resumed run logs steps 4 and 5 again, and TensorBoard keeps the
    new values only, as metrics.jsonl does."""
    cfg = micro_config(TB)
    run = RunDir(tmp_path / "runs" / "crashed")
    run.create(cfg)

    def crash_after_step_5(event, record):
        if event == "log" and record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tracked(cfg, run, inner=crash_after_step_5)
    before = read_events(run)
    assert [step for step, _ in before["train/loss"]] == [1, 2, 3, 4, 5]
    checkpoint = run.resolve_checkpoint("latest")
    run.acquire_lock()
    train_tracked(run.load_config(), run, resume_from=checkpoint)
    got = read_events(run)
    assert_same(got, expected_events(run))
    assert [step for step, _ in got["train/tok_s"]] == [1, 2, 3, 4, 5, 6]
    # steps 4 and 5 show the resumed run's timing, not the crashed one's
    assert got["train/tok_s"][3:5] != before["train/tok_s"][3:5]


def test_sweep_runs_are_grouped_under_the_sweep_name(tmp_path):
    cfg = micro_config(TB)
    sweep = tmp_path / "ablations" / "lr_tiny"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"kind": "lr", "name": "lr_tiny"}))
    for name in ("lr_1e-3", "lr_2e-3"):
        run = RunDir(sweep / name)
        assert tracking.sweep_group(run) == "lr_tiny"
        sink = tracking.TensorBoardSink(cfg, run)
        sink.log({"step": 1, "tokens": 128, "loss": 5.0, "lr": 1e-3})
        sink.close()
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "ablations")).Runs()
    assert sorted(runs) == ["lr_tiny/lr_1e-3/tensorboard", "lr_tiny/lr_2e-3/tensorboard"]
    assert tracking.sweep_group(RunDir(tmp_path / "alone")) == ""


class FakeWandb(types.ModuleType):
    """The parts of wandb the sink uses, recording what it is given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(id=kwargs["id"] or f"id{len(self.inits)}", logged=[], summary={}, finished=False)
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.inits.append((kwargs, run))
        return run


def test_wandb_gets_the_same_records_grouped_and_resumed(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sweep = tmp_path / "lr_tiny"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "lr_tiny"}))
    run = RunDir(sweep / "lr_1e-3")
    cfg = micro_config(['train.log_to=["wandb"]', 'train.wandb_mode="offline"'])
    (sink,) = tracking.make_sinks(cfg, run)
    sink.log({"step": 3, "tokens": 384, "loss": 4.5, "lr": 1e-3, "grad_norm": 0.5, "tok_s": 1e4})
    sink.log({"step": 3, "tokens": 384, "val_loss": 4.6, "val_acc": 0.1, "val_ppl": 99.5})
    sink.log({"status": "complete", "steps": 6, "best_val_loss": 4.6, "layer_types": "LF", "final_val_mqar_acc": None})
    sink.close()
    kwargs, first = fake.inits[0]
    assert (kwargs["name"], kwargs["group"], kwargs["mode"], kwargs["dir"]) == ("lr_1e-3", "lr_tiny", "offline", str(run.path))
    assert kwargs["config"]["train"]["lr"] == cfg.train.lr and kwargs["id"] is None
    assert first.logged == [(3, {"train/tokens": 384, "train/loss": 4.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "train/tok_s": 1e4}),
                            (3, {"eval/tokens": 384, "eval/val_loss": 4.6, "eval/val_acc": 0.1, "eval/val_ppl": 99.5})]
    assert first.summary == {"summary/best_val_loss": 4.6} and first.finished
    # a resumed run continues the same wandb run; without train.wandb_mode, wandb's own (WANDB_MODE) decides
    cfg.train.wandb_mode = ""
    tracking.make_sinks(cfg, run, resume_step=3)[0].close()
    kwargs, _ = fake.inits[1]
    assert (kwargs["id"], kwargs["resume"], kwargs["mode"]) == (first.id, "allow", None)


def test_wandb_offline_for_real(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "lr_tiny"}))
    run = RunDir(tmp_path / "lr_1e-3")
    (sink,) = tracking.make_sinks(micro_config(['train.log_to=["wandb"]']), run)
    sink.log({"step": 1, "tokens": 128, "loss": 5.5, "lr": 1e-3})
    sink.log({"step": 2, "tokens": 256, "loss": 5.25, "lr": 2e-3})
    sink.log({"status": "complete", "steps": 2, "best_val_loss": 5.0})
    assert (sink.run.name, sink.run.group, sink.run.settings.mode) == ("lr_1e-3", "lr_tiny", "offline")
    # wandb commits a step's row once a later step is logged: step 1 is in, step 2 waits for the end
    summary = dict(sink.run.summary)
    assert (summary["_step"], summary["train/loss"], summary["train/lr"]) == (1, 5.5, 1e-3)
    assert summary["summary/best_val_loss"] == 5.0
    sink.close()
    assert list((run.path / "wandb").glob(f"offline-run-*-{sink.run.id}/run-{sink.run.id}.wandb"))
    assert wandb.run is None


@pytest.mark.parametrize("tracker, extra", [("tensorboard", "tracking"), ("wandb", "wandb")])
def test_a_tracker_not_installed_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` raises ImportError
    out = tmp_path / "runs"
    for args in (["train", "--preset", "tiny", "--out", str(out), *cli_args_for_micro([f'train.log_to=["{tracker}"]'])],
                 ["ablate", "lr", "--preset", "tiny", "--values", "1e-3", "--out", str(out),
                  "--set", f'train.log_to=["{tracker}"]']):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 1 and f'`pip install "hybridctl[{extra}]"`' in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_log_to_is_validated():
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\); choose from tensorboard, wandb"):
        micro_config(['train.log_to=["tensorbord"]'])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        micro_config(['train.log_to=["wandb", "wandb"]'])
    with pytest.raises(ConfigError, match="train.wandb_mode must be online, offline, disabled"):
        micro_config(['train.wandb_mode="offlne"'])
    with pytest.raises(ConfigError, match="train.log_to must be a list"):
        config_from_dict({"train": {"log_to": "tensorboard"}})
    assert micro_config().train.log_to == []
