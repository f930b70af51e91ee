"""metrics.jsonl stays a true record across resumes: replayed steps supersede the killed run's records."""

import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from train.metrics_log import MetricsLog, drop_records_after, read_metrics


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + length]))
        i += 12 + length + 4
    return out


def _write(directory, steps, resume_step=0):
    log = MetricsLog(str(directory), enabled=True, resume_step=resume_step)
    for step in steps:
        log.write(step, "train", {"loss": float(step)})
    log.close()


def test_resuming_drops_the_records_after_the_checkpoint(tmp_path):
    _write(tmp_path, range(1, 8))  # killed after step 7, last checkpoint at step 4
    _write(tmp_path, range(5, 11), resume_step=4)
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == list(range(1, 11))
    # TensorBoard: the resumed run's event file starts by purging the killed run's events from step 5 on
    newest = max(glob.glob(str(tmp_path / "tensorboard" / "events.*")), key=os.path.getmtime)
    starts = [e.step for e in _events(newest) if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [5]


def test_a_fresh_start_drops_every_old_record(tmp_path):
    _write(tmp_path, range(1, 4))
    _write(tmp_path, range(1, 3))  # no checkpoint survived: the run starts again from 0
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "split": "train"}) + "\n" + '{"step": 2, "spl')
    assert drop_records_after(str(path), 5) == 1
    assert read_metrics(str(path)) == [{"step": 1, "split": "train"}]
