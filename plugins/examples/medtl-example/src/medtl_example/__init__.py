"""An example third-party medtl plugin.

It adds the backbone ``example-convnet``, the pooling ``example-attention`` and the
strategy ``example-entropy``. medtl finds it through the entry point ``example`` in
the group ``medtl``, declared in this distribution's setup.cfg.
"""

__version__ = "0.1.0"
