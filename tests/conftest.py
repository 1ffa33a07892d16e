import os

# The suite never reaches a model hub, and runs on the CPU even where a GPU is visible.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in the user's home from the suite (tests of the cache use tmp folders).
os.environ.setdefault("JSNMF_COMPILATION_CACHE", "off")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """(model, tokenizer, planted) of the planted demo model, built once for the whole run."""
    import jsnmf.models as jm
    from jsnmf import demo

    directory = demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model")
    model, tokenizer = jm.load(directory)
    return model, tokenizer, demo.read_planted(directory)
