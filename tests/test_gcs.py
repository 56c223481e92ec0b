"""Storage anywhere: the path layer (core/paths) on local files and on gs:// served by a local
GCS emulator (tests/gcs_emulator.py, no network), the run's writers on gs://, and the tiny
training job with its workdir on gs://bucket/run: stopped by SIGTERM, resumed, exported to
gs://bucket/export, with no file of the run landing outside the bucket."""

import json
import os
import signal
import subprocess
import sys
import time

import gcs_emulator
import numpy as np
import pytest
from etils import epath
from test_train import _flags, small_config

from emor3_jax.core import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = f"gs://{gcs_emulator.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment, set in this process (restored after) for epath and Orbax."""
    import fsspec

    with gcs_emulator.serve() as url:
        env = gcs_emulator.environment(url)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_GCS_TOKEN=anon, read at import otherwise
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A fresh directory: local, or a new prefix in the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("gcs")
    return f"{B}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_append_truncate_size_and_exclusive_create(root):
    f = paths.join(root, "sub", "log.txt")
    epath.Path(f).parent.mkdir(parents=True, exist_ok=True)
    assert paths.size(f) == 0
    paths.append(f, "one\n")
    paths.append(f, "twö\n")
    assert epath.Path(f).read_text(encoding="utf-8") == "one\ntwö\n" and paths.size(f) == 9
    paths.truncate(f, 4)
    assert epath.Path(f).read_text() == "one\n"
    lock = paths.join(root, "lock")
    assert paths.create_exclusive(lock, b"first") and not paths.create_exclusive(lock, b"second")
    assert epath.Path(lock).read_bytes() == b"first"
    paths.touch(lock)
    assert epath.Path(lock).read_bytes() == b"first"


def test_copy_tree_both_ways_and_listing(root, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.json").write_text("{}")
    (src / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
    (src / "a" / "w.safetensors").write_bytes(b"big")
    there = paths.copy_tree(str(src), paths.join(root, "tree"))
    assert paths.files(there) == [paths.join(there, n) for n in ("a/b/deep.bin", "a/w.safetensors", "top.json")]
    back = paths.copy_tree(there, str(tmp_path / "back"), skip=(".safetensors",))
    assert _tree(back) == ["a", "a/b", "a/b/deep.bin", "top.json"]
    assert (epath.Path(back) / "a" / "b" / "deep.bin").read_bytes() == b"\x00\x01"


def test_resolve_keeps_paths_under_their_root(tmp_path):
    assert paths.resolve(f"{B}/data", "img/../x.png") == (f"{B}/data/x.png", True)
    assert paths.resolve(f"{B}/data", "../other/x.png") == (f"{B}/other/x.png", False)
    assert paths.resolve(f"{B}/data/", ".") == (f"{B}/data", True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path)
    assert paths.resolve(tmp_path / "d", "link/x")[1] is False
    assert paths.resolve(tmp_path / "d", "y/../x") == (str(tmp_path / "d" / "x"), True)


def test_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("gs://b/run") == "gs://b/run" and paths.absolute("run") == str(tmp_path / "run")
    assert (
        paths.join("gs://b/run", "ckpt", "3") == "gs://b/run/ckpt/3"
        and paths.parent("gs://b/run/ckpt/") == "gs://b/run"
    )
    assert paths.is_uri("gs://b") and not paths.is_uri("/gs:/b")


def test_scratch_copies_uris_once_keeps_local_paths_and_is_removed(gcs, tmp_path):
    src = f"{B}/scratch-src-{time.time_ns()}"
    epath.Path(src).mkdir(parents=True, exist_ok=True)
    epath.Path(src, "config.json").write_text('{"a": 1}')
    scratch = paths.Scratch(str(tmp_path / "base"))
    assert scratch.local(str(tmp_path), "x") == str(tmp_path) and scratch.dir is None  # nothing made for local
    copy = scratch.local(src, "hf")
    assert copy.startswith(str(tmp_path / "base")) and json.loads(open(os.path.join(copy, "config.json")).read()) == {
        "a": 1
    }
    epath.Path(src, "config.json").write_text('{"a": 2}')
    assert scratch.local(src, "hf") == copy  # copied once
    scratch.close()
    assert os.listdir(tmp_path / "base") == []


def test_run_writers_on_gs(gcs):
    """metrics.jsonl / samples.txt cut back on rewind, TensorBoard events, the workdir lock and
    a damaged checkpoint moved aside, all on gs://."""
    import jax.numpy as jnp

    from emor3_jax.core.checkpoint import Checkpointer
    from emor3_jax.core.metrics import MetricWriter
    from emor3_jax.core.workdir_lock import WorkdirBusy, WorkdirLock

    run = f"{B}/writers-{time.time_ns()}"
    w = MetricWriter(run)
    w.write("p", 1, {"loss": 1.0})
    w.text("p", 1, "sample_0", "text\r\nwith lines")
    sizes = w.sizes()
    w.write("p", 2, {"loss": 2.0})
    w.rewind(sizes)
    w.write("p", 3, {"loss": 3.0})
    w.close()
    rows = [json.loads(x) for x in epath.Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3]
    events = [f for f in paths.files(paths.join(run, "tensorboard")) if "tfevents" in f]
    assert events and all(paths.size(f) > 0 for f in events)

    with WorkdirLock(run):
        with pytest.raises(WorkdirBusy, match="in use by another run"):
            WorkdirLock(run).acquire()
    assert not epath.Path(run, "run.lock").exists()

    ck = Checkpointer(paths.join(run, "ckpt"), keep=3, async_save=False)
    state = {"w": jnp.arange(4.0)}
    for step in (1, 2):
        ck.save(step, state, {"step": step})
    ck.wait()
    epath.Path(run, "ckpt", "2", "meta", "metadata").write_text("{not json")
    got = ck.restore_newest_intact(lambda meta: state, None)
    ck.close()
    assert got.step == 1 and got.moved == {2: f"{run}/ckpt/2.corrupt"}
    assert epath.Path(got.moved[2]).is_dir() and not epath.Path(run, "ckpt", "2").exists()


# test_train's tiny run (OVERRIDES), shorter: 2 cold-start and 2 GRPO steps on 16 records.
SHORTER = {"cold_start.steps": 2, "rl.steps": 2, "data.synthetic_train": 16, "log.samples_every": 1}


def _tree(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, ds, fs in os.walk(d) for f in fs + ds)


def _outside(tmp) -> list[str]:
    """What the run left in TMPDIR, less the compile-cache folder that importing torch (a test
    dependency: transformers imports it when installed) makes there."""
    return [n for n in _tree(tmp) if not n.startswith("torchinductor_")]


@pytest.mark.slow
def test_tiny_job_on_gs_resumes_and_exports_leaving_nothing_outside(gcs, tmp_path, monkeypatch):
    """In this process (two runs' compiles: minutes on 2 cores): the tiny run on gs://, then the
    same run extended by a GRPO step resumes from its gs:// checkpoint, then the export to gs://.
    Nothing appears in the working directory or the scratch base, and no folder named gs: anywhere."""
    from emor3_jax import trainer
    from emor3_jax.export import export

    workdir, out = f"{B}/run-fast-{time.time_ns()}", f"{B}/export-fast-{time.time_ns()}"
    cwd, scratch = tmp_path / "cwd", tmp_path / "scratch"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    c = small_config(workdir, **{**SHORTER, "cold_start.steps": 1, "rl.steps": 1, "eval.every": 1})
    c.scratch_dir = str(scratch)
    trainer.run(c)
    c.rl.steps = 2  # may change on resume
    results = trainer.run(c)
    assert results["workdir"] == workdir
    rows = [json.loads(x) for x in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] in ("cold_start", "grpo")] == [1, 2, 3]
    export(workdir, out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {epath.Path(f).name for f in paths.files(out)}
    assert _tree(cwd) == [] and _tree(scratch) == []
    assert not [d for d in (cwd, scratch, ROOT) if os.path.exists(os.path.join(d, "gs:"))]


@pytest.mark.slow
def test_tiny_job_on_gs_stops_resumes_and_exports_leaving_nothing_outside(gcs, tmp_path):
    """The run's workdir is gs://bucket/run: SIGTERM after its first checkpoint, the same command
    resumes to the end, and the export goes to gs://bucket/export. The processes run in an empty
    working directory with HOME and TMPDIR of their own: all three are empty at the end (the
    scratch copies of the data store are gone), and no folder named gs: appears anywhere."""
    workdir, out = f"{B}/run-{time.time_ns()}", f"{B}/export-{time.time_ns()}"
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for d in (cwd, home, tmp):
        d.mkdir()
    env = dict(os.environ, **gcs, PYTHONPATH=ROOT, HOME=str(home), TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "emor3_jax.train", *_flags(workdir, **SHORTER)]

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not epath.Path(workdir, "ckpt", "1", "commit_success.txt").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 300, "no checkpoint after 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "SIGTERM: saved step" in first, first[-3000:]
    assert _outside(tmp) == [], "the stopped run left its scratch directory"

    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {workdir}/ckpt/" in done.stdout
    rows = [json.loads(x) for x in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] in ("cold_start", "grpo")] == [1, 2, 3, 4]  # each step once
    for name in ("results.json", "tokenizer/tokenizer.json", "data/emotions/1.0.0/dataset_info.json", "samples.txt"):
        assert epath.Path(workdir, name).is_file(), name
    assert paths.files(paths.join(workdir, "tensorboard")) and epath.Path(workdir, "best").is_dir()

    from emor3_jax.export import export

    export(workdir, out)
    hf_dir = paths.copy_tree(out, str(tmp_path / "exported"))
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir)
    # The exported tokenizer's image placeholder is the model config's image token.
    assert AutoTokenizer.from_pretrained(hf_dir).convert_tokens_to_ids("<|image_pad|>") == hf.config.image_token_id
    emb = hf.model.language_model.embed_tokens.weight.detach().numpy()
    assert np.isfinite(emb).all() and emb.std() > 0

    assert _tree(cwd) == [] and _outside(tmp) == [] and _tree(home) == []
    assert not [d for d in (cwd, home, tmp, ROOT) if os.path.exists(os.path.join(d, "gs:"))]
