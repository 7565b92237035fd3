"""Commands that read a finished workdir (evaluate, export, report, predict) and the demo that drives a whole run.

They read the stages' results through the runner's `Workdir` and the frame's readers (pipeline/outputs.py),
never through a stage module.
"""
