"""Suite-wide pytest settings.

nbval waits only 5 s for each output message after a cell finishes (a hard-coded value). A long
training cell on a busy 2-core machine can leave the kernel's output thread further behind than
that, and nbval then fails the cell although it ran fine. Give it a minute.
"""
try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval not installed: notebooks are not collected anyway
    IPyNbCell = None

NBVAL_OUTPUT_TIMEOUT_S = 60

if IPyNbCell is not None:
    _nbval_init = IPyNbCell.__init__

    def _init_with_longer_output_timeout(self, *args, **kwargs):
        _nbval_init(self, *args, **kwargs)
        self.output_timeout = NBVAL_OUTPUT_TIMEOUT_S

    IPyNbCell.__init__ = _init_with_longer_output_timeout
