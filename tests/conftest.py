"""Shared fixtures. Tests run on CPU, offline, and start Ray at most once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_t5(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random T5 (encoder-decoder, standing in for FLAN-T5) with the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def tiny_bert_scorer(out: Path, num_layers: int = 1) -> str:
    """A randomly initialised BERT (hidden 32, ``num_layers`` layers) with the MiniLM tokenizer and
    no dropout: a scorer folder that trains and scores in a blink."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from cappy_core.scorer.model import embedded_model_path

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
                     num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(embedded_model_path())).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def bigbench_root() -> Path:
    """The release's task files on this machine (``cappy data download`` put them in the cache).
    Skipped, saying so, where there are none: this build vendors no BIG-Bench (no copy of the
    release was at hand when it was made; PyPI no longer serves bigbench 1.0.0), and the tests
    never download. Tests of the data path itself run on a stand-in (tests/fake_release.py)."""
    from cappy_core.data.cache import bigbench_dir

    root = bigbench_dir() / "benchmark_tasks"
    if not (root.is_dir() and any(root.glob("*/task.json"))):
        pytest.skip(f"needs BIG-Bench 1.0.0's task files, and {root} has none (none vendored in this build): "
                    "`cappy data download --from bigbench-1.0.0.tar.gz` (or a checkout) puts them there")
    return root


@pytest.fixture(scope="session")
def bigbench():
    """The real BIG-Bench tasks this machine has (vendored with the package or downloaded), as a
    :class:`~cappy_core.data.catalog.TaskCatalog`; skipped, saying so, where it has none."""
    from cappy_core.data.catalog import TaskCatalog

    catalog = TaskCatalog.open()
    if not catalog.names:
        pytest.skip("needs BIG-Bench 1.0.0's examples, and this machine has none (this build vendors none, nothing "
                    "was downloaded): `cappy data download --from bigbench-1.0.0.tar.gz` (or a checkout)")
    return catalog


@pytest.fixture(scope="session")
def standin_tasks(tmp_path_factory) -> Path:
    """A ``--task-dir`` of made-up tasks in BIG-Bench's format (tests/fake_release.py): the pipeline
    tests run on these, so they need no BIG-Bench on the machine."""
    from fake_release import write_standin_tasks

    return write_standin_tasks(tmp_path_factory.mktemp("standin_tasks"))


@pytest.fixture(scope="session")
def ray_address() -> str:
    """One local Ray for the whole session (2 CPUs, no dashboard, loopback only, no token
    auth). Jobs run as subprocesses connect to it through ``RAY_ADDRESS`` instead of starting
    their own cluster. A stalled Ray Data pipeline fails instead of hanging."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
    import ray

    from jobs.local_ray import use_loopback

    use_loopback()  # every Ray server on 127.0.0.1, and the jobs' RAY_ADDRESS stays 127.0.0.1 (jobs/local_ray.py)
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                   object_store_memory=1_500_000_000)
    address = ctx.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
