"""hf_path / tokenizer_path accept a Hugging Face hub id, resolved once by
config_lib.resolve_hub_ids (which the entry points call before they validate) into the HF
cache; offline and not cached the error is one line naming the flag for a local path; a local
directory is kept as it is; any other value is refused naming the flag. No test here reaches
the network: HF_HUB_OFFLINE=1 throughout."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from huggingface_hub import constants

from configs.qwen_vl import get_config
from emor3_jax import config_lib

REPO = "emor3-test/Qwen2.5-VL-never-downloaded"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # an empty cache of our own


def _config(tmp_path, **paths):
    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    for flag, value in paths.items():
        c[flag] = value
    return c


@pytest.mark.parametrize("flag", ["hf_path", "tokenizer_path"])
def test_an_uncached_hub_id_offline_is_one_line_naming_the_flag_for_a_local_path(tmp_path, flag):
    c = _config(tmp_path, **{flag: REPO})
    with pytest.raises(ValueError) as err:
        config_lib.resolve_hub_ids(c)
    message = str(err.value)
    assert "\n" not in message
    assert f"--config.{flag}='{REPO}' is a Hugging Face hub id" in message
    assert "HF_HUB_OFFLINE=1" in message and f"--config.{flag}=/local/dir" in message


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(tmp_path):
    snapshot = tmp_path / "hf_cache" / "models--emor3-test--Qwen2.5-VL-never-downloaded" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert config_lib.hub_snapshot(REPO, "hf_path") == str(snapshot)


def test_a_local_dir_is_kept_as_it_is(tmp_path):
    hf = tmp_path / "Qwen2.5-VL-3B-Instruct"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    c = _config(tmp_path, hf_path=str(hf), tokenizer_path=str(hf))
    config_lib.resolve_hub_ids(c)
    assert (c.hf_path, c.tokenizer_path) == (str(hf), str(hf))
    # A relative local dir that reads like a hub id stays local too.
    (tmp_path / "Qwen").mkdir()
    (tmp_path / "Qwen" / "local").mkdir()
    rel = _config(tmp_path, tokenizer_path="Qwen/local")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        config_lib.resolve_hub_ids(rel)
        assert rel.tokenizer_path == "Qwen/local" and not config_lib.is_hub_id("Qwen/local")


@pytest.mark.parametrize("value", ["/no/such/checkpoint", "a/b/c", "Qwen/../x", "-bad/name", "no_slash_at_all"])
@pytest.mark.parametrize("flag", ["hf_path", "tokenizer_path"])
def test_a_value_neither_a_dir_nor_a_hub_id_is_refused_naming_the_flag(tmp_path, flag, value):
    c = _config(tmp_path, **{flag: value})
    with pytest.raises(ValueError, match=f"--config.{flag}='{value}' is neither a local directory nor a Hugging Face"):
        config_lib.validate(c)


def test_a_dir_without_config_json_is_refused_for_hf_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        config_lib.validate(_config(tmp_path, hf_path=str(tmp_path / "empty")))


def test_eval_resolves_the_tokenizer_hub_id_too(tmp_path):
    """`python -m emor3_jax.eval` resolves the hub id before anything else (a process of its own:
    eval and export define flags of the same names, so both cannot be imported in one)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf_cache"), PYTHONPATH=str(root))
    cmd = [
        *(sys.executable, "-m", "emor3_jax.eval", "--config=configs/qwen_vl.py", f"--config.tokenizer_path={REPO}"),
        *(f"--config.workdir={tmp_path / 'run'}", f"--checkpoint={tmp_path / 'no_checkpoint'}", "--datasets=test"),
        f"--out={tmp_path / 'out'}",
    ]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"--config.tokenizer_path='{REPO}' is a Hugging Face hub id" in line and "/local/dir" in line, line


@pytest.mark.parametrize("flag", ["hf_path", "tokenizer_path"])
def test_validation_downloads_nothing_the_entry_points_resolver_does(tmp_path, monkeypatch, flag):
    """validate leaves a hub id as it is, says it was not resolved, and never calls the hub;
    the resolver the entry points call (here through trainer.Run.checked) is what reaches it."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    c = _config(tmp_path, **{flag: REPO})
    with pytest.raises(ValueError) as err:
        config_lib.validate(c)
    assert calls == [] and c[flag] == REPO
    assert f"--config.{flag}='{REPO}' is a Hugging Face hub id not yet resolved" in str(err.value)
    from emor3_jax import trainer

    with pytest.raises(ValueError, match=f"--config.{flag}='{REPO}' is a Hugging Face hub id that is not in the local"):
        trainer.Run.checked(c)
    assert calls == [REPO]
