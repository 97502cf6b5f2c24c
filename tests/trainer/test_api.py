"""The trainer's control API over real HTTP: bad configs are 422s naming the field; runs start,
stream their events, stop on request, and show up in /metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from opd.bundled import STUDENT_PATH, TEACHER_PATH
from services.teacher.app import create_app as create_teacher_app
from services.teacher.process import free_port
from services.teacher.settings import TeacherSettings
from services.trainer import checkpoint
from services.trainer.api import (
    LOOPBACK_NAMES,
    create_app,
    event_stream,
    loopback_only,
    strict_json,
)
from services.trainer.config import RunConfig
from services.trainer.loop import run
from services.trainer.runs import RunRecord
from tests.conftest import a_closed_port, serve, teacher_with_another_tokenizer, wait_for
from tests.conftest import strict_json as parsed_strictly
from tests.teacher.test_routes import SlowLoadBackend

SMALL = dict(
    prompts_per_step=2,
    samples_per_prompt=2,
    schedule="truncated:16",
    eval_n=4,
    eval_every=0,
    micro_batch=4,
    threads=1,
    progress=False,
)


@pytest.fixture(scope="module")
def trainer_url():
    with serve(create_app(), ready_path="/health") as url:
        yield url


@pytest.mark.parametrize(
    "body, param",
    [
        ({"schedule": "sometimes"}, "schedule"),
        ({"steps": 0}, "steps"),
        ({"teacher_url": ["ftp://x"]}, "teacher_url"),
        ({"loss": "mse"}, "loss"),
        ({"device": "gpu"}, "device"),
        ({"stepz": 3}, "stepz"),
        ({"steps": "3"}, "steps"),  # a count is a JSON number, not a string that looks like one
        ({"steps": True}, "steps"),
        ({"resume": "yes"}, "resume"),
        # Paths this machine cannot look up, and a key no header can carry.
        ({"student": "~nosuchuser/model"}, "student"),
        ({"student": "s" * 5000}, "student"),
        ({"out": "a\u0000b"}, "out"),
        ({"out": "o" * 5000}, "out"),
        ({"api_key": "key\n"}, "api_key"),
    ],
)
def test_bad_config_is_422_naming_the_field(trainer_url, body, param):
    r = httpx.post(trainer_url + "/runs", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == param


def test_the_view_of_a_run_whose_loss_diverged_is_strict_json(tmp_path):
    app = create_app()
    record = RunRecord(id="run-nan", config=RunConfig(out=str(tmp_path)), status="running")
    record.last_step = {"step": 3, "reverse_kl": float("nan"), "loss": float("inf")}
    with serve(app, ready_path="/health") as url:
        app.state.runs.records[record.id] = record  # as a diverging run reports its step
        r = httpx.get(f"{url}/runs/run-nan")
    assert r.status_code == 200
    assert r.json()["last_step"] == {"step": 3, "reverse_kl": None, "loss": None}


def test_a_config_check_across_fields_speaks_of_fields_not_flags(trainer_url):
    r = httpx.post(trainer_url + "/runs", json={"resume": True, "overwrite": True})
    assert r.status_code == 422
    assert "overwrite starts over and resume continues" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_400_as_on_the_teacher(trainer_url):
    r = httpx.post(
        trainer_url + "/runs", content=b"{steps: 3", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "malformed_body"
    assert "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, says",
    [(b"[1]", "must be a JSON object"), (b"5", "must be a JSON object"), (b"", "empty")],
)
def test_a_body_that_is_no_object_is_400_not_a_field_error(trainer_url, body, says):
    r = httpx.post(
        trainer_url + "/runs", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_body"
    assert says in r.json()["error"]["message"]


def test_a_body_in_another_form_is_415_as_on_the_teacher(trainer_url):
    r = httpx.post(
        trainer_url + "/runs", content=b'{"steps": 3}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
    # As a web page's fetch(..., {mode: "no-cors", body: blob}) sends it, to any site.
    r = httpx.post(trainer_url + "/runs", content=b'{"steps": 3}')
    assert r.status_code == 415 and "no Content-Type" in r.json()["error"]["message"]
    r = httpx.post(trainer_url + "/runs")  # nothing at all: the body is what is missing
    assert r.status_code == 400 and "body is empty" in r.json()["error"]["message"]


def test_a_bad_field_in_a_json_body_of_a_structured_type_is_422_naming_it(trainer_url):
    """FastAPI reads application/...+json as JSON: a good body so sent starts a run, so a bad
    one gets the field's 422, not a 415 for its Content-Type."""
    r = httpx.post(
        trainer_url + "/runs",
        content=b'{"steps": "two"}',
        headers={"content-type": "application/merge-patch+json"},
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text


def test_a_run_into_the_folder_of_another_is_422_before_it_starts(trainer_url, tmp_path):
    (tmp_path / "config.json").write_text(RunConfig().model_dump_json())  # a previous run's
    before = httpx.get(trainer_url + "/runs").json()
    r = httpx.post(trainer_url + "/runs", json={"out": str(tmp_path), "steps": 1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "out"
    # In the API's words: the fields a client sends, not the command line's flags.
    assert "resume to continue it, overwrite to start over" in r.json()["error"]["message"]
    assert httpx.get(trainer_url + "/runs").json() == before  # no run was started


def test_a_run_that_could_never_start_is_422_naming_the_field(trainer_url, teacher_url, tmp_path):
    """Each refused before a 201, instead of a run that fails in the background."""
    (tmp_path / "a-file").write_text("")
    cases = [
        ({"teacher_url": [f"http://127.0.0.1:{a_closed_port()}"]}, "teacher_url", "unreachable"),
        ({"teacher_url": ["http://127.0.0.1:99999"]}, "teacher_url", "port 99999 out of range"),
        ({"student": str(tmp_path / "nothing")}, "student", "no such file or directory"),
        ({"out": str(tmp_path / "a-file")}, "out", "a-file is a file, not a folder"),
        ({"out": str(tmp_path / "a-file" / "run")}, "out", "a-file is a file, not a folder"),
        # The teacher's own limits, read from its /info as the run would.
        ({"loss": "forward_kl_topk", "top_k": 50}, "top_k", "allows at most 20"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "device", "CUDA"))
    # A resume its checkpoint cannot continue (a run of 1 step with SMALL's schedule).
    done = {**SMALL, "teacher_url": [teacher_url], "out": str(tmp_path / "done"), "steps": 1}
    run(RunConfig(**done))
    resume = {"out": done["out"], "resume": True}
    cases.append(({**resume, "schedule": "full"}, "schedule", "trained with schedule"))
    before = httpx.get(trainer_url + "/runs").json()
    for fields, param, says in cases:
        body = {**SMALL, "teacher_url": [teacher_url], "out": str(tmp_path / "run"), **fields}
        r = httpx.post(trainer_url + "/runs", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (fields, r.text)
        assert says in r.json()["error"]["message"], r.text
    assert httpx.get(trainer_url + "/runs").json() == before  # no run was started


def test_a_horizon_beyond_the_teachers_max_seq_len_is_422_naming_its_field(trainer_url, tmp_path):
    short = create_teacher_app(TeacherSettings(model=str(TEACHER_PATH), max_seq_len=150))
    with serve(short) as url:
        for fields, param in [
            ({"schedule": "full"}, "max_new_tokens"),  # the schedule reaches H_max
            ({"schedule": "truncated:128"}, "schedule"),
        ]:
            body = {**SMALL, "teacher_url": [url], "out": str(tmp_path / "run"), **fields}
            r = httpx.post(trainer_url + "/runs", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
            assert "exceeds the max_seq_len 150" in r.json()["error"]["message"]


def test_a_teacher_with_another_tokenizer_is_422_naming_teacher_url(trainer_url, tmp_path):
    other = teacher_with_another_tokenizer(tmp_path / "other-teacher")
    with serve(create_teacher_app(TeacherSettings(model=str(other)))) as url:
        body = {**SMALL, "teacher_url": [url], "out": str(tmp_path / "run")}
        r = httpx.post(trainer_url + "/runs", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == "teacher_url"
    assert "another tokenizer" in r.json()["error"]["message"]


def test_a_replica_still_loading_does_not_hide_the_others_from_the_checks(
    trainer_url, teacher_url, tmp_path
):
    loading = SlowLoadBackend(str(TEACHER_PATH))
    app = create_teacher_app(TeacherSettings(model=str(TEACHER_PATH)), backend=loading)
    with serve(app, ready_path="/health") as loading_url:
        try:
            for others, param, says in [
                ([f"http://127.0.0.1:{a_closed_port()}"], "teacher_url", "unreachable"),
                ([teacher_url], "top_k", "allows at most 20"),  # a ready one's limits still count
            ]:
                body = {
                    **SMALL,
                    "loss": "forward_kl_topk",
                    "top_k": 50,
                    "teacher_url": [loading_url, *others],
                    "out": str(tmp_path / "run"),
                }
                r = httpx.post(trainer_url + "/runs", json=body)
                assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
                assert says in r.json()["error"]["message"]
        finally:
            loading.release.set()  # before the server stops: its shutdown waits for the load


def without(*names: str):
    def spoil(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return spoil


def with_config(**fields):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))

    return edit


@pytest.mark.parametrize(
    "spoil, says",
    [
        (
            without("tokenizer.json", "tokenizer_config.json"),
            "no tokenizer (none of tokenizer.json",
        ),
        (without("model.safetensors"), "no weights files (*.safetensors, *.bin, *.pt)"),
        (with_config(model_type="no-such-model"), "unreadable config.json"),
        (with_config(vocab_size=8), "tokenizer has 23 tokens but the model's vocab_size is 8"),
        (with_config(vocab_size=40), "has a vocabulary of 40 ids, the teacher at"),
    ],
    ids=[
        "no-tokenizer",
        "no-weights",
        "unknown-model-type",
        "vocab-smaller-than-tokenizer",
        "vocab-past-the-teachers",
    ],
)
def test_a_student_folder_that_cannot_load_is_422_naming_student(
    trainer_url, teacher_url, tmp_path, spoil, says
):
    """Each was a 201 and then a failed run (the tokenizer aside), as the README promised not."""
    student = tmp_path / "student"
    shutil.copytree(STUDENT_PATH, student)
    spoil(student)
    body = {**SMALL, "teacher_url": [teacher_url], "student": str(student), "out": str(tmp_path)}
    r = httpx.post(trainer_url + "/runs", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == "student", r.text
    assert says in r.json()["error"]["message"]


def test_a_bug_is_a_500_in_the_error_shape_not_plain_text(
    trainer_url, teacher_url, monkeypatch, tmp_path
):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("services.trainer.api.check_teacher_limits", broken)
    body = {**SMALL, "teacher_url": [teacher_url], "out": str(tmp_path / "run")}
    r = httpx.post(trainer_url + "/runs", json=body)
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (RuntimeError)"


def test_unknown_routes_and_methods_answer_in_the_error_shape(trainer_url):
    r = httpx.get(trainer_url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = httpx.delete(trainer_url + "/runs")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
    assert "POST" in r.headers["allow"]  # the header a 405 must carry


def events_of(url: str, run_id: str, headers: dict | None = None) -> list[dict]:
    events = []
    route = f"{url}/runs/{run_id}/events"
    with httpx.stream("GET", route, headers=headers, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_events_published_while_the_stream_sends_are_sent_before_it_ends():
    """The run's last events land while a follower's stream is paused sending earlier ones: they
    must still go out, `done` last, before the stream ends."""

    async def follow() -> list[str]:
        record = RunRecord(id="run-1", config=RunConfig(), status="running")
        record.publish({"type": "step", "step": 0})
        stream = event_stream(record, keep_alive_s=0.05)
        sent = [await anext(stream)]
        record.publish({"type": "step", "step": 1})  # the run's last step and end, mid-send
        record.publish({"type": "done", "completed": True})
        record.status = "completed"
        sent += [frame async for frame in stream]
        return sent

    frames = asyncio.run(follow())
    assert [frame.split("\n")[0] for frame in frames] == ["event: step"] * 2 + ["event: done"]


def test_a_waiting_stream_wakes_for_each_new_event():
    async def follow() -> list[str]:
        record = RunRecord(id="run-1", config=RunConfig(), status="running")
        stream = event_stream(record, keep_alive_s=60)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, record.publish, {"type": "step", "step": 0})
        first = await asyncio.wait_for(anext(stream), timeout=5)
        record.publish({"type": "done", "completed": True})
        record.status = "completed"
        return [first] + [frame async for frame in stream]

    frames = asyncio.run(follow())
    assert [frame.split("\n")[0] for frame in frames] == ["event: step", "event: done"]


def test_each_follower_of_a_run_is_woken_for_its_last_events():
    """One follower, taking the last events at once, must not swallow the wake-up of another whose
    wait has not begun yet (that one would get `done` only at its next keep-alive)."""

    async def follow() -> tuple[list[str], list[str]]:
        record = RunRecord(id="run-1", config=RunConfig(), status="running")
        record.publish({"type": "step", "step": 0})
        first, second = event_stream(record, keep_alive_s=60), event_stream(record, keep_alive_s=60)
        await anext(first), await anext(second)
        waiting = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0)  # the second finds nothing new and starts to wait
        record.publish({"type": "done", "completed": True})
        record.status = "completed"
        from_first = [frame async for frame in first]
        from_second = [await asyncio.wait_for(waiting, timeout=5)]
        return from_first, from_second + [frame async for frame in second]

    for frames in asyncio.run(follow()):
        assert [frame.split("\n")[0] for frame in frames] == ["event: done"]


def test_a_follower_that_reconnects_goes_on_after_the_last_event_it_got():
    async def follow(after: int) -> list[str]:
        record = RunRecord(id="run-1", config=RunConfig(), status="completed")
        for step in range(4):
            record.publish({"type": "step", "step": step})
        record.publish({"type": "done", "completed": True})
        return [frame async for frame in event_stream(record, after=after)]

    first = asyncio.run(follow(0))
    assert [frame.split("\n")[1] for frame in first] == [f"id: {n}" for n in range(1, 6)]
    again = asyncio.run(follow(3))  # as an EventSource sends Last-Event-ID: 3
    assert again == first[3:]


def test_a_finished_runs_follower_with_every_event_gets_204_and_a_bad_id_starts_afresh(tmp_path):
    app = create_app()
    record = RunRecord(id="run-x", config=RunConfig(out=str(tmp_path)), status="completed")
    record.publish({"type": "done", "completed": True})
    with serve(app, ready_path="/health") as url:
        app.state.runs.records[record.id] = record
        events = f"{url}/runs/run-x/events"
        # An EventSource stops reconnecting on a 204; a 200 with no events has it come back.
        assert httpx.get(events, headers={"Last-Event-ID": "1"}).status_code == 204
        for after in ("9" * 5000, "-1", "1.0", ""):  # not a number we sent: from the start
            r = httpx.get(events, headers={"Last-Event-ID": after})
            assert r.status_code == 200 and r.text.startswith("event: done\nid: 1\n")
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"


def test_a_full_server_or_another_thread_count_is_refused_before_any_check(tmp_path):
    app = create_app(max_runs=2)
    with serve(app, ready_path="/health") as url:
        busy = RunRecord(id="busy", config=RunConfig(threads=2), status="running")
        app.state.runs.records[busy.id] = busy
        body = {
            "out": str(tmp_path / "run"),
            "teacher_url": [f"http://127.0.0.1:{a_closed_port()}"],
        }
        other = httpx.post(url + "/runs", json={**body, "threads": 1})
        assert other.status_code == 422 and other.json()["error"]["param"] == "threads"
        app.state.runs.records["starting"] = RunRecord(id="starting", config=RunConfig())
        full = httpx.post(url + "/runs", json=body)
        assert full.status_code == 429 and "--max-runs 2" in full.json()["error"]["message"]
        assert int(full.headers["retry-after"]) > 0


def test_run_streams_steps_samples_evals_and_done(trainer_url, teacher_url, tmp_path):
    body = {**SMALL, "teacher_url": [teacher_url], "steps": 3, "out": str(tmp_path / "run")}
    r = httpx.post(trainer_url + "/runs", json=body)
    assert r.status_code == 201
    run_id = r.json()["id"]
    events = events_of(trainer_url, run_id)
    kinds = [e["type"] for e in events]
    assert events[0] == {"type": "started", "step": 0, "resumed": False}
    assert kinds.count("step") == 3 and kinds.count("sample") == 3 and kinds[-1] == "done"
    assert kinds.count("eval") == 2  # before training and at the end
    sample = next(e for e in events if e["type"] == "sample")
    assert sample["prompt"].startswith("Q:") and sample["teacher_logprobs"]
    assert len(sample["teacher_logprobs"]) == len(sample["student_logprobs"])
    view = httpx.get(f"{trainer_url}/runs/{run_id}").json()
    assert view["status"] == "completed" and view["last_step"]["step"] == 3
    last_but_one = {"Last-Event-ID": str(len(events) - 1)}  # as an EventSource reconnects
    assert events_of(trainer_url, run_id, last_but_one) == events[-1:]
    metrics = httpx.get(trainer_url + "/metrics").text
    assert f'opd_trainer_steps_total{{run="{run_id}"}} 3.0' in metrics


def test_stop_ends_a_run_after_the_current_step(trainer_url, teacher_url, tmp_path):
    body = {**SMALL, "teacher_url": [teacher_url], "steps": 500, "out": str(tmp_path / "run")}
    run_id = httpx.post(trainer_url + "/runs", json=body).json()["id"]
    # A second run into the folder of a running one is refused, even one told to overwrite it.
    second = httpx.post(trainer_url + "/runs", json={**body, "overwrite": True})
    assert second.status_code == 422 and second.json()["error"]["param"] == "out"
    assert f"in use by {run_id}" in second.json()["error"]["message"]
    with httpx.stream("GET", f"{trainer_url}/runs/{run_id}/events", timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("event: step"):
                assert httpx.post(f"{trainer_url}/runs/{run_id}/stop").status_code == 202
                break
    events = events_of(trainer_url, run_id)  # replays history, ends when the run ends
    assert events[-1]["type"] == "done" and not events[-1]["completed"]
    view = httpx.get(f"{trainer_url}/runs/{run_id}").json()
    assert view["status"] == "stopped" and view["last_step"]["step"] < 500
    again = httpx.post(f"{trainer_url}/runs/{run_id}/stop")  # nothing left to stop
    assert again.status_code == 200 and again.json()["stopping"] is False
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_unknown_run_is_404(trainer_url):
    r = httpx.get(trainer_url + "/runs/run-999")
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"


def test_a_server_that_stops_lets_its_runs_end_their_step_and_save(teacher_url, tmp_path):
    out = tmp_path / "run"
    body = {**SMALL, "teacher_url": [teacher_url], "steps": 10_000, "out": str(out)}
    with serve(create_app(), ready_path="/health") as url:  # no checkpoint_every: only at the end
        run_id = httpx.post(url + "/runs", json=body).json()["id"]
        wait_for(lambda: httpx.get(f"{url}/runs/{run_id}").json()["last_step"] is not None)
    # The server has shut down: the run stopped at a step boundary and wrote its checkpoint.
    found = checkpoint.latest(out)
    assert found is not None
    assert json.loads((found / "state.json").read_text())["step"] >= 1


# uvicorn ends by raising the signal it caught again once it has shut down: SIGTERM's default action
# ends the process, and Ctrl-C's KeyboardInterrupt becomes exit status 130.
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_server_stopped_by_a_signal_sends_its_followers_each_runs_last_events(
    teacher_url, tmp_path, sig, status
):
    """`opd-trainer serve` in its own process: a signal stops the run after its step, and a client
    following its events gets the run's `done` before the stream ends (not a cut connection)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.cli", "serve", "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _answers(url + "/health"), timeout=120)
        body = {**SMALL, "teacher_url": [teacher_url], "steps": 10_000, "out": str(tmp_path / "r")}
        run_id = httpx.post(url + "/runs", json=body).json()["id"]
        events, signalled = [], False
        with httpx.stream("GET", f"{url}/runs/{run_id}/events", timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "step" and not signalled:  # once: a second
                        server.send_signal(sig)  # Ctrl-C is a forced exit
                        signalled = True
        assert server.wait(timeout=120) == status
    finally:
        server.kill()
    assert "Traceback" not in log.read_text()
    assert events[-1]["type"] == "done" and not events[-1]["completed"]
    last_step = [e for e in events if e["type"] == "step"][-1]["step"]
    state = json.loads((checkpoint.latest(tmp_path / "r") / "state.json").read_text())
    assert state["step"] == last_step


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_events_are_strict_json_with_non_finite_numbers_as_null():
    """A diverging run's NaN loss or a teacher's -inf log-prob must not make an event that
    strict parsers (a browser's JSON.parse) refuse."""

    event = {"type": "step", "loss": float("nan"), "lp": [float("-inf"), -1.5], "n": 3}
    data = parsed_strictly(strict_json(event))
    assert data == {"type": "step", "loss": None, "lp": [None, -1.5], "n": 3}


def test_a_server_on_loopback_answers_only_to_loopback_names():
    """A web page whose own name a DNS server points at 127.0.0.1 (DNS rebinding) reached the
    API from the operator's browser as a same-origin page, and could start runs."""
    assert [loopback_only(h) for h in ("127.0.0.1", "::1", "localhost")] == [True] * 3
    assert not any(loopback_only(h) for h in ("0.0.0.0", "10.0.0.5", "::", "teacher"))
    with serve(create_app(allowed_hosts=LOOPBACK_NAMES), ready_path="/health") as url:
        assert httpx.get(url + "/runs").status_code == 200
        rebound = httpx.get(url + "/runs", headers={"Host": "evil.example:8100"})
        assert rebound.status_code == 400
        assert httpx.get(url + "/runs", headers={"Host": "localhost"}).status_code == 200
