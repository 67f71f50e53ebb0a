"""Training: ``python -m train`` runs ``loop.train_and_evaluate``.

Modules: ``config`` (every config key and its default), ``mesh`` (the ``('data', 'model')``
mesh and shardings), ``state`` (the TrainState, created sharded), ``optimizer`` (schedules and
Gluon-style Nesterov SGD), ``steps`` (the jitted train and eval steps), ``checkpoint`` (Orbax),
``metrics`` (metrics.jsonl, TensorBoard, progress bar), ``plot`` (curves.png), ``summary``
(parameters and FLOPs), ``loop`` (the loop itself), ``errors`` (the one-line errors and their
exit codes), ``workdir_lock`` (one run per workdir), ``stop_signals`` (SIGTERM / SIGINT as
save-and-stop), ``distributed`` (joining a multi-process job with a deadline), ``tasks``
(classification / segmentation), ``pretrained`` (``init_from``).
"""
