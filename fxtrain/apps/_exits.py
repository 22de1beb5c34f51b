"""The exit statuses of ``fxtrain demo`` and ``fxtrain train`` (docs/cli.md), without torch: the
command line's ``--help`` lists them."""

NONFINITE_EXIT = 3  # nan_guard stopped the run at a non-finite loss or gradient norm

EXIT_STATUSES = (
    "exit status: 0 done (all steps, or stopped early by a callback such as early stopping); "
    "1 an error (its traceback); 2 a bad {what} or workdir, nothing changed; "
    f"{NONFINITE_EXIT} stopped by nan_guard at a NaN or infinite loss or gradient norm (a line "
    "names the step, the metric, the latest checkpoint and fx.debug.find_nonfinite(train_step, "
    "state, batch)); 130 Ctrl-C, 143 SIGTERM (each saves a checkpoint first)")
