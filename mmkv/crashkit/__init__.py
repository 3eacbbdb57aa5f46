"""The crash-testing kit: it drives the public ``mmkv.Store`` from outside, never the reverse.

    torture  the kill harness (with bystanders) and the power-loss simulator
    fuzz     damaged-file fuzzing: every outcome must be ok or an ``mmkv.Error``

The failpoints these harnesses arm live in the engine (``mmkv.engine.failpoints``): the
engine passes through them, so they sit below it.  Nothing in ``mmkv`` imports this package
except the CLI's ``torture`` command.
"""
