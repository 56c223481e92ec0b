"""The run's logs after a resume: metrics.jsonl and samples.txt cut back to a checkpoint's sizes
(all gone for a fresh start), TensorBoard rebuilt from them, so each step is logged once."""

import json
import os
import struct

from emor3_jax.core.metrics import MetricWriter


def tb_events(workdir) -> list[tuple[str, int, object]]:
    """(tag, step, scalar value or text) of every summary in the workdir's TensorBoard files,
    read as TFRecords (8-byte length, 4-byte crc, the Event proto, 4-byte crc)."""
    from tensorboardX.proto import event_pb2

    out, tb = [], os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
                out.append((v.tag, event.step, v.simple_value if text is None else text))
    return out


def _log(w, steps):
    for s in steps:
        w.write("grpo", s, {"loss": float(s)})
        w.text("grpo", s, "sample_0", f"response {s}\n=== not a header\nline")


def test_rewind_drops_what_came_after_the_checkpoint_everywhere(tmp_path):
    w = MetricWriter(str(tmp_path))
    _log(w, [1, 2])
    sizes = w.sizes()
    _log(w, [3, 4])  # logged, then the run was killed before saving again
    w.close()
    w = MetricWriter(str(tmp_path))  # the resumed run
    w.rewind(sizes)
    _log(w, [3, 4, 5])
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    samples = open(tmp_path / "samples.txt").read()
    assert [samples.count(f"=== grpo step {s} sample_0\n") for s in range(1, 6)] == [1] * 5
    events = tb_events(tmp_path)
    assert sorted(s for t, s, _ in events if t == "grpo/loss") == [1, 2, 3, 4, 5]
    assert sorted(s for t, s, _ in events if t.startswith("grpo/sample_0")) == [1, 2, 3, 4, 5]
    # The text survives the rebuild whole, its "===" line included.
    assert ("grpo/sample_0/text_summary", 2, "response 2\n=== not a header\nline") in events


def test_rewind_to_nothing_empties_the_logs_of_an_attempt_killed_before_its_first_checkpoint(tmp_path):
    w = MetricWriter(str(tmp_path))
    _log(w, [1, 2, 3])
    w.close()
    w = MetricWriter(str(tmp_path))
    w.rewind({})
    _log(w, [1])
    w.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]
    assert [s for t, s, _ in tb_events(tmp_path) if t == "grpo/loss"] == [1]
