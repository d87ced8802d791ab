import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one store per pytest-xdist worker: two processes never share a SQLite file
os.environ.setdefault("TRACKIO_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "trackio",
                                                  os.environ.get("PYTEST_XDIST_WORKER", "main")))
warnings.filterwarnings("ignore")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tiny models gain nothing from two, and two threads spin-wait badly
# whenever the other core is busy (measured: a 30-step SFT run 2 s with one thread, 20 s with two).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("self_healing").setLevel(logging.WARNING)
    yield
