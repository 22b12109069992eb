"""What a hub download fetches, offline: the hub's file listing and download are stand-ins."""
import fnmatch

import pytest

from helpers.errors import CheckpointError
from helpers.formats import sources

OPENLLAMA = ["config.json", "generation_config.json", "pytorch_model.bin", "special_tokens_map.json",
             "tokenizer.model", "tokenizer_config.json", "README.md"]
SAFE = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "training_args.bin"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub: list_repo_files answers from `repos`, snapshot_download 'downloads' the files its
    patterns select into tmp_path and records them."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    repos, fetched = {"openlm-research/open_llama_3b": OPENLLAMA, "org/safe": SAFE}, {}

    def list_repo_files(repo_id, **kw):
        if repo_id not in repos:
            raise OSError("offline")
        return repos[repo_id]

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        if repo_id not in repos:
            raise OSError("offline")
        fetched[repo_id] = sorted(f for f in repos[repo_id] if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_bin_weights_are_fetched_only_where_there_are_no_safetensors(hub):
    sources._hub_download("openlm-research/open_llama_3b")
    assert hub["openlm-research/open_llama_3b"] == ["config.json", "generation_config.json", "pytorch_model.bin",
                                                    "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    sources._hub_download("org/safe")
    assert hub["org/safe"] == ["config.json", "model.safetensors", "tokenizer.json"]


def test_an_unreachable_repository_is_one_error(hub):
    with pytest.raises(CheckpointError, match="org/missing: could not download org/missing from the hub"):
        sources._hub_download("org/missing")
