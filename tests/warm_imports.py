"""What a tiny training run imports, imported once by the forkserver of tests/warm.py."""

from vlds.distributed import import_deepspeed

import_deepspeed()
import deepspeed.runtime.engine  # noqa: E402, F401
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402, F401
import open_clip  # noqa: E402, F401
import torch.utils.tensorboard  # noqa: E402, F401
import transformers.models.bart.modeling_bart  # noqa: E402, F401
import transformers.models.t5.modeling_t5  # noqa: E402, F401

import vlds.checkpoint  # noqa: E402, F401
import vlds.data.build  # noqa: E402, F401
import vlds.evaluate  # noqa: E402, F401
import vlds.model.build  # noqa: E402, F401
import vlds.train  # noqa: E402, F401
import vlds.trainer  # noqa: E402, F401
