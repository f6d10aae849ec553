"""Where fine-tuning moved the model's attention: local and global token dependencies, entropy and the
mass on each part of the prompt, base (adapter disabled) against fine-tuned, on a finished run.

``python -m laffi_exp.attention RUN_DIR`` (see ``__main__``), or ``analysis.attention=true`` at the end
of a run. ``measures`` defines the statistics, ``segments`` finds the prompt's parts in its tokens,
``analysis`` loads a run and collects the statistics, ``report`` and ``plots`` write ``RUN_DIR/attention/``.
"""
