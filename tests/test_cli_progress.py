"""Progress off a terminal: plain lines as work advances (so `nohup ... > log` shows it), none at 0."""

from cli.app import LineProgress


def test_line_progress_logs_each_tenth_once(capsys):
    bar = LineProgress()
    task = bar.add_task("harvest add_sub", total=20, status="")
    for step in range(21):
        bar.update(task, completed=step, status=f"loss {1 / (step + 1):.2f}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("harvest add_sub: 2/20 loss 0.33")
    assert lines[-1].startswith("harvest add_sub: 20/20")


def test_line_progress_advance_and_unknown_total(capsys):
    bar = LineProgress()
    overall = bar.add_task("tasks", total=2, status="")
    open_ended = bar.add_task("embedding", total=None, status="")
    bar.update(open_ended, completed=5)
    bar.advance(overall)
    bar.advance(overall)
    assert capsys.readouterr().err.splitlines() == ["tasks: 1/2 [0s]", "tasks: 2/2 [0s]"]


def test_line_progress_reports_status_changes_when_due(capsys):
    bar = LineProgress(status_every_s=0)
    task = bar.add_task("bench", total=None, status="")
    bar.update(task, status="training the DnD generator")
    bar.update(task, completed=0)  # no status: nothing new to say
    assert capsys.readouterr().err.splitlines() == ["bench: 0 training the DnD generator [0s]"]
    quiet = LineProgress(status_every_s=3600)
    task = quiet.add_task("bench", total=4, status="")
    quiet.update(task, status="phase two")
    assert capsys.readouterr().err == ""


def test_line_progress_prints_new_phases_at_once_and_rate_limits_updates(capsys):
    bar = LineProgress(status_every_s=3600)
    task = bar.add_task("bench", total=None, status="")
    for message in ("embedding prompts", "training on cpu", "training on cpu, step 2", "storing the generator"):
        bar.update(task, status=message)
    assert [line.split(" [")[0] for line in capsys.readouterr().err.splitlines()] == [
        "bench: 0 training on cpu", "bench: 0 storing the generator"]  # the first status waits its turn
