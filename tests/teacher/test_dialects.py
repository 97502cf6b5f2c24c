"""TRL's and vLLM's OpenAI-style dialects, driven by the real clients (trl's VLLMClient, the `openai`
package): same numbers as POST /score, right shapes, unsupported options refused with a 400.
Runs in the vLLM CI stage, where trl (which needs vLLM importable) and openai are installed."""

from __future__ import annotations

import numpy as np
import pytest

from shared.client import TeacherClient
from tests.teacher.test_routes_dialects import TOL, reference

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("k", [1, 5])
def test_trl_vllm_client_matches_score(teacher_url, seqs, k):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=teacher_url, connection_timeout=10)
    out = client.get_sequence_logprobs(
        sequences=[p + c for p, c in seqs],
        prompt_lengths=[len(p) for p, _ in seqs],
        top_logprobs=k,
        temperature=1.0,
    )
    for i, (ref, (_, completion)) in enumerate(zip(reference(teacher_url, seqs, k), seqs)):
        assert np.array(out["logprobs"][i]).shape == (len(completion), k)
        np.testing.assert_allclose(np.array(out["actual_logprobs"][i])[:, 0], ref.logprobs, **TOL)
        np.testing.assert_allclose(out["logprobs"][i], ref.topk_logprobs, **TOL)
        assert np.array_equal(out["logprob_token_ids"][i], ref.topk_ids)
        assert [row[0] for row in out["actual_token_ids"][i]] == completion


def test_openai_completions_prompt_logprobs_match_score(teacher_url, seqs):
    from openai import OpenAI

    client = OpenAI(base_url=teacher_url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    prompts = [p + c for p, c in seqs]
    resp = client.completions.create(
        model=model,
        prompt=prompts,
        max_tokens=0,
        echo=True,
        logprobs=2,
        extra_body={"prompt_logprobs": 3},
    )
    with TeacherClient(teacher_url) as direct:
        # Every prompt position after the first, as /score sees it.
        refs = direct.score([(s[:1], s[1:]) for s in prompts], top_k=3).results
    for choice, seq, ref in zip(resp.choices, prompts, refs):
        plp = choice.model_extra["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(seq)
        for t, entry in enumerate(plp[1:]):
            actual = entry[str(seq[t + 1])]
            np.testing.assert_allclose(actual["logprob"], ref.logprobs[t], **TOL)
            top = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:3]
            assert [int(tok) for tok, _ in top] == ref.topk_ids[t].tolist()
        assert choice.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], ref.logprobs, **TOL)
        assert choice.logprobs.top_logprobs[0] is None
        for t, top in enumerate(choice.logprobs.top_logprobs[1:]):  # the top 2 and the token
            assert 2 <= len(top) <= 3 and choice.logprobs.tokens[t + 1] in top
    assert resp.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_openai_logprobs_0_gives_each_token_its_own_log_prob_as_vllm_does(teacher_url, seqs):
    from openai import OpenAI

    client = OpenAI(base_url=teacher_url + "/v1", api_key="unused")
    prompt = seqs[0][0] + seqs[0][1]
    resp = client.completions.create(
        model=client.models.list().data[0].id, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    logprobs = resp.choices[0].logprobs
    assert logprobs.top_logprobs[0] is None
    rows = zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:])
    assert all(top == {token: logprob} for token, logprob, top in rows)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"prompt": "text"}, "prompt"),
        ({"max_tokens": 5}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stream": True}, "stream"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"guided_json": {}}, "guided_json"),
    ],
)
def test_openai_unsupported_options_are_400(teacher_url, extra, param):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=teacher_url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    body = {"prompt": [1, 21, 18], "max_tokens": 0}
    body.update({k: v for k, v in extra.items() if k in ("prompt", "max_tokens", "n", "stream")})
    others = {k: v for k, v in extra.items() if k not in body}
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=model, **body, extra_body=others)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
