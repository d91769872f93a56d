"""The real huggingface_hub client against a real Hub-compatible server (olah) serving local git repositories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

if TYPE_CHECKING:
    from tests.hubserver import HubServer

pytest_plugins = ["tests.hubserver"]  # the hub_server fixture; import nothing from it before pytest does

REPO = "acme/tiny-clip"


def make_model(folder: Path, version: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "version": version}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle, never downloaded")
    return folder


@pytest.fixture(scope="module")
def published(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """REPO with main at v2 and tag v1 on the first commit; a 'dev' branch; a text_encoder subfolder; a private repo."""
    root = tmp_path_factory.mktemp("models")
    v1 = hub_server.publish(REPO, make_model(root / "v1", 1), tag="v1")
    v2 = hub_server.publish(REPO, make_model(root / "v2", 2))
    dev = hub_server.publish(REPO, make_model(root / "dev", 3), branch="dev")
    pipe = hub_server.publish("acme/pipeline", make_model(root / "enc", 4), path_in_repo="text_encoder")
    hub_server.publish("acme/secret", make_model(root / "secret", 5), private=True)
    return {"v1": v1, "main": v2, "dev": dev, "pipeline": pipe}


def test_model_info_resolves_branches_and_tags_to_the_git_commit(hub_server: HubServer, published: dict[str, str]):
    api = HfApi(endpoint=hub_server.endpoint)
    for revision in ("main", "v1", "dev"):
        info = api.model_info(REPO, revision=revision)
        assert info.sha == published[revision] == hub_server.rev_parse(REPO, revision)
    assert published["v1"] != published["main"] != published["dev"]
    assert api.model_info(REPO, revision=published["v1"]).sha == published["v1"]
    assert sorted(api.list_repo_files(REPO, revision="v1")) == [
        "config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]
    refs = api.list_repo_refs(REPO)
    assert {r.name: r.target_commit for r in refs.tags} == {"v1": published["v1"]}
    assert {r.name: r.target_commit for r in refs.branches} == {"main": published["main"], "dev": published["dev"]}


def test_hf_hub_download_at_a_revision(hub_server: HubServer, published: dict[str, str], tmp_path: Path):
    path = hf_hub_download(REPO, "config.json", revision="v1", endpoint=hub_server.endpoint, cache_dir=tmp_path)
    assert json.loads(Path(path).read_text())["version"] == 1
    assert Path(path).parent.name == published["v1"]  # the cache records the commit the tag resolved to
    assert (tmp_path / "models--acme--tiny-clip" / "refs" / "v1").read_text() == published["v1"]
    path = hf_hub_download("acme/pipeline", "config.json", subfolder="text_encoder", revision="main",
                           endpoint=hub_server.endpoint, cache_dir=tmp_path)
    assert json.loads(Path(path).read_text())["version"] == 4


def test_snapshot_download_fetches_only_the_allowed_files(hub_server: HubServer, published: dict[str, str],
                                                          tmp_path: Path):
    folder = Path(snapshot_download(REPO, revision="main", allow_patterns=["*.json", "*.safetensors"],
                                    endpoint=hub_server.endpoint, cache_dir=tmp_path))
    assert folder.name == published["main"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.rglob("*.bin"))
    folder = Path(snapshot_download("acme/pipeline", revision="main", allow_patterns=["text_encoder/*.json"],
                                    endpoint=hub_server.endpoint, cache_dir=tmp_path))
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == ["config.json", "tokenizer.json"]


def test_missing_private_and_unknown_revision_raise_repository_not_found(hub_server: HubServer,
                                                                         published: dict[str, str], tmp_path: Path):
    api = HfApi(endpoint=hub_server.endpoint)
    with pytest.raises(RepositoryNotFoundError) as missing:
        api.model_info("acme/does-not-exist", revision="main")
    assert missing.value.response.status_code == 401
    assert missing.value.response.headers["x-error-code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/secret", revision="main")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/secret", "config.json", endpoint=hub_server.endpoint, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):  # olah offline answers an unknown revision as a missing repo
        api.model_info(REPO, revision="no-such-branch")
    assert api.model_info(REPO, revision="main", token="hf_anything").sha == published["main"]  # tokens are accepted


def test_unreachable_endpoint(tmp_path: Path):
    from tests.hubserver import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Exception) as refused:  # huggingface_hub 2.4 lets the transport error through: httpx2
        HfApi(endpoint=dead).model_info(REPO, revision="main")
    assert type(refused.value).__name__ == "ConnectError"
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, revision="main", endpoint=dead, cache_dir=tmp_path)


CLIENT = """
import json, sys
from huggingface_hub import constants, snapshot_download
folder = snapshot_download(sys.argv[1], revision=sys.argv[2], allow_patterns=["*.json", "*.safetensors"])
print(json.dumps({"endpoint": constants.ENDPOINT, "offline": constants.HF_HUB_OFFLINE, "folder": folder}))
"""


def run_client(env: dict[str, str], revision: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CLIENT, REPO, revision], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_env_configured_process_then_offline_from_its_cache(hub_server: HubServer, published: dict[str, str],
                                                            tmp_path: Path):
    hf_home = tmp_path / "hf"
    online = run_client(hub_server.client_env(hf_home), "v1")
    assert online["endpoint"] == hub_server.endpoint and not online["offline"]
    assert Path(online["folder"]).name == published["v1"]
    assert Path(online["folder"]).is_relative_to(hf_home / "hub")
    offline = run_client(hub_server.client_env(hf_home, offline=True, HF_ENDPOINT="http://127.0.0.1:9"), "v1")
    assert offline["offline"] and offline["folder"] == online["folder"]
    assert json.loads((Path(offline["folder"]) / "config.json").read_text())["version"] == 1
