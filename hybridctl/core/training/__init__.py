"""Training: a run from its config to its summary. `trainer.train(cfg, run)` is the entry point.

    trainer.py            Trainer: builds a run's parts, runs the loop (fit), evaluates, saves, stops; train() runs one
    state.py              TrainState: everything the loop changes, as checkpoints carry it
    schedule.py           the LR schedule
    steps.py              device and precision, optimizer and its step, micro-batches, compile and DDP, forward/backward
    evaluation.py         evaluation on the validation windows
    divergence.py         when a run has diverged, and the error that says so
    metrics.py            where log and eval records go (metrics.jsonl, the callback)
    tracking.py           TensorBoard and Weights & Biases mirrors of the metrics
    summary.py            summary.json's content
    preflight.py          checks before a run starts (tokens against the config, disk space)
    run_warnings.py       warnings about a run's plan, before it starts (torch-free)
    runs.py               run folders
    checkpoint.py         checkpoints written and loaded
    checkpoint_files.py   a checkpoint folder read without torch (what compare and report need)
    checkpoint_writer.py  checkpoints written in a background thread (the loop waits only for a copy in memory)
    distributed.py        several processes under torchrun
    processes.py          which process this is, and the signals that stop training
"""
