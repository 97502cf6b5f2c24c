"""The whole system in real containers, with an API key: two teacher replicas behind the load
balancer, a short distillation in the trainer container, one teacher stopped mid-run; `up` running
a short demo as the README's first Docker command does; and the GPU
override and the trainer's streams setting as compose renders them (no GPU needed). Runs in the
Docker CI stage (`make test-docker`), after docker/setup-ci.sh; skipped where Docker or compose v2
is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from services.teacher.process import free_port
from shared.client import TeacherClient

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parent.parent
PROJECT = "opdci"
STEPS = 12
KEY = "ci-key"


def compose(
    *args: str, env: dict, check: bool = True, timeout: float = 1200, project: str = PROJECT
):
    cmd = ["docker", "compose", "-p", project, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def has_compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def has_compose_v2() -> bool:
    """The compose v2 CLI and a Docker daemon to run its containers."""
    ok = has_compose_cli()
    return ok and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def needs(ok: bool, what: str) -> None:
    """Skip without `what`; in CI's Docker stage (OPD_REQUIRE_DOCKER=1) fail instead, so that stage
    cannot pass having run nothing."""
    if ok:
        return
    reason = f"needs {what} (see docker/setup-ci.sh)"
    if os.environ.get("OPD_REQUIRE_DOCKER") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    needs(has_compose_v2(), "a Docker daemon and compose v2")
    # Not made here: Docker makes it, owned by root, as on a user's first `docker compose up`.
    results = tmp_path_factory.mktemp("compose") / "results"
    port = free_port()
    env = {
        **os.environ,
        "OPD_RESULTS": str(results),
        "OPD_TEACHER_PORT": str(port),
        "OPD_TEACHER_API_KEY": KEY,  # the teachers need it; the trainer must send it unasked
    }
    compose("build", env=env)
    try:
        compose("run", "--rm", "results", env=env)  # as `up` runs it before the trainer
        compose("up", "-d", "--scale", "teacher=2", "lb", env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, compose("logs", env=env, check=False).stdout[-3000:]
            time.sleep(1)
        yield url, env, results
    finally:
        compose("down", "-v", "--remove-orphans", env=env, check=False)


def teacher_containers(env) -> list[str]:
    return compose("ps", "-q", "teacher", env=env).stdout.split()


def scored_requests(container: str) -> float:
    probe = (
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:8000/metrics').read().decode())"
    )
    text = subprocess.run(
        ["docker", "exec", container, "python3", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in text.splitlines():
        if line.startswith('opd_teacher_requests_total{route="/score",status="200"}'):
            return float(line.split()[-1])
    return 0.0


def test_both_replicas_answer_score_through_the_balancer(stack):
    url, env, _ = stack
    auth = {"Authorization": f"Bearer {KEY}"}
    instances = {httpx.get(url + "/info", headers=auth).json()["instance"] for _ in range(20)}
    assert len(instances) == 2
    assert httpx.post(url + "/score", json={"sequences": []}).status_code == 401
    with TeacherClient(url, api_key=KEY) as client:
        for _ in range(10):
            result = client.score([([1, 21, 18, 5], [6, 14, 7])], top_k=2)
            assert len(result.results[0].logprobs) == 3
    containers = teacher_containers(env)
    assert len(containers) == 2
    assert all(scored_requests(c) > 0 for c in containers)


def test_distillation_survives_a_teacher_stopping_mid_run(stack):
    url, env, results = stack
    name = f"{PROJECT}-trainer-ci"
    compose(
        "run",
        "-d",
        "--no-deps",  # the stack is up; with deps, compose would scale teacher back to one
        "--name",
        name,
        "trainer",
        "opd-trainer",
        "run",
        "--teacher-url",
        "http://lb:8000",
        "--streams-per-url",  # a step's frames on both replicas, the stopped one's rescored
        "2",
        "--steps",
        str(STEPS),
        "--out",
        "/results/ci",
        "--prompts-per-step",
        "8",
        "--samples-per-prompt",
        "2",
        "--micro-batch",
        "4",
        "--schedule",
        "truncated:48",
        "--eval-n",
        "16",
        "--eval-every",
        "0",
        "--no-progress",
        env=env,
    )
    metrics = results / "ci" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "the trainer did not get going"
        time.sleep(0.5)
    victim = teacher_containers(env)[0]
    subprocess.run(["docker", "stop", "-t", "0", victim], check=True, capture_output=True)
    code = subprocess.run(["docker", "wait", name], capture_output=True, text=True, timeout=900)
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr[-2000:]
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert code.stdout.strip() == "0", logs
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # none lost, none twice
    assert all(r["teacher_tokens"] >= r["tokens_generated"] for r in records)  # all scored
    assert (results / "ci" / "summary.json").exists()


def test_up_runs_the_demo_through_the_balancer_and_ends_with_its_exit_status(tmp_path):
    """The README's first Docker command, `docker compose up --exit-code-from trainer trainer`,
    with the demo cut short by an override file: the teacher, its health check, the balancer, the
    results folder handed over (Docker makes it, root's) and the trainer, as depends_on orders
    them, and `up` ends with the demo's status."""
    needs(has_compose_v2(), "a Docker daemon and compose v2")
    short = ["--steps", "2", "--eval-n", "8", "--schedules", "full", "topd-10"]
    command = ["opd", "demo", "--teacher-url", "http://lb:8000", "--out", "/results", *short]
    override = tmp_path / "short.yml"  # JSON is YAML
    override.write_text(json.dumps({"services": {"trainer": {"command": command}}}))
    results = tmp_path / "results"
    env = {**os.environ, "OPD_RESULTS": str(results), "OPD_TEACHER_PORT": str(free_port())}
    files = ["-f", "docker-compose.yml", "-f", str(override)]
    project = f"{PROJECT}up"
    try:
        up = compose(
            *files, "up", "--exit-code-from", "trainer", "trainer", env=env, project=project
        )
        assert up.returncode == 0
        rows = json.loads((results / "results.json").read_text())
        assert [row["run"] for row in rows] == ["full", "topd-10"]
        assert all(row["teacher_tokens"] >= row["tokens_generated"] > 0 for row in rows)
        assert (results / "comparison.png").stat().st_size > 0
    finally:
        compose(*files, "down", "-v", "--remove-orphans", env=env, check=False, project=project)


def test_gpu_override_gives_the_teacher_the_named_gpu():
    """Compose merges the override onto the base file: the teacher gets GPU OPD_TEACHER_GPU (not
    `count: 1`, which is GPU 0 for every replica), the vllm backend, and a long start period."""
    needs(has_compose_cli(), "the compose v2 CLI")
    env = {**os.environ, "OPD_TEACHER_GPU": "3"}
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    rendered = compose(*files, "config", "--format", "json", env=env, timeout=60).stdout
    teacher = json.loads(rendered)["services"]["teacher"]
    (device,) = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["3"] and "count" not in device
    assert teacher["environment"]["OPD_TEACHER_BACKEND"] == "vllm"
    assert teacher["healthcheck"]["start_period"] == "20m0s"
    assert teacher["environment"]["OPD_TEACHER_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert teacher["environment"]["OPD_TEACHER_DTYPE"] == "bfloat16"
    env["OPD_TEACHER_DTYPE"] = "float16"  # a GPU without bfloat16 (T4, V100)
    rendered = compose(*files, "config", "--format", "json", env=env, timeout=60).stdout
    assert (
        json.loads(rendered)["services"]["teacher"]["environment"]["OPD_TEACHER_DTYPE"] == "float16"
    )


def test_teacher_settings_compose_does_not_name_reach_the_teacher_from_its_env_file(tmp_path):
    """Only the model, backend, key and served name are passed by name: a model that needs
    trust_remote_code or a max_seq_len had no way in."""
    needs(has_compose_cli(), "the compose v2 CLI")
    settings = tmp_path / "teacher.env"
    settings.write_text("OPD_TEACHER_MAX_SEQ_LEN=4096\nOPD_TEACHER_BACKEND=vllm\n")
    env = {**os.environ, "OPD_TEACHER_ENV_FILE": str(settings)}
    env.pop("OPD_TEACHER_BACKEND", None)
    rendered = compose("config", "--format", "json", env=env, timeout=60).stdout
    teacher = json.loads(rendered)["services"]["teacher"]["environment"]
    assert teacher["OPD_TEACHER_MAX_SEQ_LEN"] == "4096"
    assert teacher["OPD_TEACHER_BACKEND"] == "hf"  # compose's own setting wins
    env["OPD_TEACHER_ENV_FILE"] = str(tmp_path / "none.env")  # none: no setting, no error
    rendered = compose("config", "--format", "json", env=env, timeout=60).stdout
    assert (
        "OPD_TEACHER_MAX_SEQ_LEN" not in json.loads(rendered)["services"]["teacher"]["environment"]
    )


def test_the_balancer_is_published_on_loopback_unless_told_otherwise():
    """Without OPD_TEACHER_API_KEY the teachers answer anyone: `docker compose up` must not put
    them on every interface of the host (published ports pass host firewalls such as ufw)."""
    needs(has_compose_cli(), "the compose v2 CLI")
    unset = {k: v for k, v in os.environ.items() if k != "OPD_TEACHER_BIND"}
    for env, host_ip in (({}, "127.0.0.1"), ({"OPD_TEACHER_BIND": "0.0.0.0"}, "0.0.0.0")):
        rendered = compose("config", "--format", "json", env={**unset, **env}, timeout=60)
        (port,) = json.loads(rendered.stdout)["services"]["lb"]["ports"]
        assert port["host_ip"] == host_ip and port["target"] == 8000


def test_opd_teacher_streams_reaches_the_demos_command():
    """`OPD_TEACHER_STREAMS=3 docker compose up --scale teacher=3`: the demo opens three streams a
    step through the balancer, one per replica."""
    needs(has_compose_cli(), "the compose v2 CLI")
    for env, streams in (({}, "1"), ({"OPD_TEACHER_STREAMS": "3"}, "3")):
        unset = {k: v for k, v in os.environ.items() if k != "OPD_TEACHER_STREAMS"}
        rendered = compose("config", "--format", "json", env={**unset, **env}, timeout=60)
        command = json.loads(rendered.stdout)["services"]["trainer"]["command"]
        assert command[:2] == ["opd", "demo"]
        assert command[command.index("--streams-per-url") + 1] == streams
