"""innerloop.io: what a resume reads back of a log a crash or a full disk cut short."""

from innerloop.io import truncate_jsonl


def test_truncate_jsonl_drops_lines_after_the_step_and_lines_cut_short(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.2}\n'
                   '"not a record"\n{"loss": 0.1}\n{"step": 4, "lo')  # the last line was cut by a full disk
    truncate_jsonl(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


def test_truncate_jsonl_of_a_missing_file_does_nothing(tmp_path):
    truncate_jsonl(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()
