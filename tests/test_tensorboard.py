"""Our TensorBoard event files (aff_jax.training.tensorboard) against tensorboardX's."""
import struct

import numpy as np

from aff_jax.training import tensorboard


def test_crc32c_check_value():
    # The standard CRC-32C check value (RFC 3720, appendix B.4).
    assert tensorboard.crc32c(b'123456789') == 0xE3069283


def test_events_serialize_as_tensorboardx_writes_them():
    from tensorboardX.crc32c import crc32c as reference_crc
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary

    rng = np.random.default_rng(0)
    data = rng.bytes(1000)
    assert tensorboard.crc32c(data) == reference_crc(data)
    for step, tag, value in ((0, 'train/loss', 0.0), (7, 'eval/accuracy', 0.9375),
                             (123456789, 'train/learning_rate', -1.5e-7)):
        wall_time = 1764123456.25 + step
        reference = Event(wall_time=wall_time, step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString()
        ours = tensorboard.encode_event(step, wall_time, scalars={tag: value})
        assert ours == reference
    assert tensorboard.encode_event(40, 2.5, file_version='brain.Event:2') == Event(
        wall_time=2.5, step=40, file_version='brain.Event:2').SerializeToString()
    assert tensorboard.encode_event(40, 2.5, session_start=True) == Event(
        wall_time=2.5, step=40, session_log=SessionLog(status=SessionLog.START)
    ).SerializeToString()


def test_written_file_has_valid_framing_and_reads_back(tmp_path):
    from tensorboardX.crc32c import crc32c as reference_crc

    writer = tensorboard.EventWriter(tmp_path, purge_step=20)
    writer.scalars(25, {'train/loss': 1.25, 'train/accuracy': 0.5})
    writer.close()
    data = writer.path.read_bytes()

    def masked(crc):
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    offset, records = 0, 0
    while offset < len(data):
        (length,) = struct.unpack_from('<Q', data, offset)
        (length_crc,) = struct.unpack_from('<I', data, offset + 8)
        assert length_crc == masked(reference_crc(data[offset:offset + 8]))
        record = data[offset + 12:offset + 12 + length]
        (record_crc,) = struct.unpack_from('<I', data, offset + 12 + length)
        assert record_crc == masked(reference_crc(record))
        offset += 16 + length
        records += 1
    assert records == 5  # file version, purge (version + session start), two scalars
    events = list(tensorboard.read_events(writer.path))
    assert [e.step for e in events] == [0, 20, 20, 25, 25]
    assert [e.scalars for e in events[-2:]] == [{'train/loss': 1.25}, {'train/accuracy': 0.5}]


def test_reads_what_tensorboardx_writes(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    values = {3: 0.1, 6: 2.0 / 3.0, 9: 1e-9}
    for step, value in values.items():
        writer.add_scalar('train/loss', value, step)
    writer.close()
    (path,) = tmp_path.glob('events.out.tfevents.*')
    read = {e.step: e.scalars['train/loss'] for e in tensorboard.read_events(path) if e.scalars}
    assert read == {step: float(np.float32(value)) for step, value in values.items()}
