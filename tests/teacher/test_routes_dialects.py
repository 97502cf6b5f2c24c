"""Bad input on the TRL and OpenAI dialect routes, over raw HTTP (the real TRL and openai clients are
driven in test_dialects.py, in the vLLM stage): a 400 in the OpenAI error shape, in the dialect's own
words, naming the field; never a 500."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher import deps, routes_openai, routes_trl
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings
from shared.client import TeacherClient
from shared.task import problems
from tests.conftest import serve, strict_json, wait_for
from tests.teacher.test_routes import (
    DEEP,
    HUGE_INT,
    GatedBackend,
    assert_error,
    held_while_health_answers,
)

TRL = "/get_sequence_logprobs/"
OPENAI = "/v1/completions"
TRL_GOOD = {"sequences": [[1, 21, 18, 5, 6]], "prompt_lengths": [3], "top_logprobs": 2}
OPENAI_GOOD = {"prompt": [1, 21, 18, 5], "max_tokens": 0, "echo": True, "logprobs": 0}
# A dialect and /score run the same model, though not bit for bit: TRL's VLLMClient asks for
# max_tokens 1, which scores one more row per sequence (its next token), so rows fall elsewhere in
# the output layer's matrix product and float32 rounds some differently (5.7e-6 at -12 seen). A real
# mistake (a shifted position, a temperature skipped) moves a log-prob by far more.
TOL = {"atol": 1e-5, "rtol": 1e-6}


def post(url: str, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        return httpx.post(url + route, content=body, headers=headers, timeout=30)
    return httpx.post(url + route, json=body, timeout=30)


@pytest.mark.parametrize("route", [TRL, OPENAI])
@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": "\xff"}', DEEP, HUGE_INT])
def test_a_body_that_is_not_json_is_400(teacher_url, route, body):
    assert_error(post(teacher_url, route, body), 400, says="not valid JSON")


@pytest.mark.parametrize("route", [TRL, OPENAI])
@pytest.mark.parametrize("body", [b"[1]", b"null"])
def test_a_body_that_is_no_object_is_400(teacher_url, route, body):
    assert_error(post(teacher_url, route, body), 400, says="body must be a JSON object")


def test_trl_field_errors_name_the_field_in_plain_words(teacher_url):
    r = post(teacher_url, TRL, {**TRL_GOOD, "sequences": [[1, 21, True, 5]]})
    assert_error(r, 400, param="sequences.0", says="token ids")
    assert "Value error" not in r.json()["error"]["message"]


def test_trl_top_logprobs_over_the_limit_is_named_in_trl_words(teacher_url):
    r = post(teacher_url, TRL, {**TRL_GOOD, "top_logprobs": 25})
    assert_error(
        r, 400, param="top_logprobs", says="top_logprobs 25 exceeds this server's max_top_k"
    )


@pytest.mark.parametrize("response_format", ["json", "binary"])
def test_trl_top_logprobs_over_the_limit_is_refused_when_nothing_is_to_be_scored(
    teacher_url, response_format
):
    """Prompts only: no forward, but the response would still be sized by top_logprobs (10**20
    made numpy fail, a 500; 10**9 answered 200 with a [1, 0, 10**9] shape)."""
    for top in (10**9, 10**20):
        body = {"sequences": [[1, 2]], "prompt_lengths": [2], "top_logprobs": top}
        r = post(teacher_url, TRL, {**body, "response_format": response_format})
        assert_error(r, 400, param="top_logprobs", says="exceeds this server's max_top_k")


def test_openai_logprobs_over_the_limit_is_refused_when_nothing_is_to_be_scored(teacher_url):
    r = post(teacher_url, OPENAI, {**OPENAI_GOOD, "prompt": [1], "logprobs": 10**9})
    assert_error(r, 400, param="logprobs", says="exceeds this server's max_top_k")


@pytest.mark.parametrize(
    "route, body, param",
    [
        # 1,000 prompts of 420 tokens at 20 log-probs: 8.8M entries, in a 2 MB body
        (OPENAI, {"prompt": [[1] * 420] * 1000, "max_tokens": 0, "prompt_logprobs": 20}, "prompt"),
        (
            OPENAI,  # echo's logprobs count as well as prompt_logprobs (4.4M each)
            {
                "prompt": [[1] * 420] * 500,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 20,
                "prompt_logprobs": 20,
            },
            "prompt",
        ),
        (
            TRL,
            {"sequences": [[1] * 420] * 1000, "prompt_lengths": [1] * 1000, "top_logprobs": 20},
            "sequences",
        ),
        (  # 200 tokens to score in all, but the binary form pads 40,000 rows to the longest
            TRL,
            {
                "sequences": [[1] * 420] + [[1, 2]] * 40_000,
                "prompt_lengths": [1] * 40_001,
                "top_logprobs": 20,
                "response_format": "binary",
            },
            "sequences",
        ),
    ],
)
def test_a_response_too_large_to_build_is_refused_before_any_scoring(
    teacher_url, route, body, param
):
    """A small body may ask for a response of many gigabytes: OpenAI's per-token dicts take some
    230 bytes an entry while they are built, so an unchecked 64 MiB body would need 180 GB."""
    r = post(teacher_url, route, body)
    assert_error(r, 400, param=param, says="a response holds at most 8,388,608")


def test_the_answer_size_limit_counts_what_a_dialect_answers_not_what_it_scores(
    teacher_url, monkeypatch
):
    """max_tokens 1 with no log-probs answers one token a prompt, though it scores the whole
    prompt at top-k 1 inside: /score's count of that was refused with a field the dialect has not
    (`sequences`)."""
    from services.teacher import scoring

    monkeypatch.setattr(scoring, "MAX_RESPONSE_ENTRIES", 50)
    prompts = [[1, 21, 18, 5, 6, 7, 8, 9, 10, 11]] * 4  # 40 positions scored at top-k 1: 80
    r = post(teacher_url, OPENAI, {"prompt": prompts, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    body = {"sequences": [{"prompt_ids": p[:1], "completion_ids": p[1:]} for p in prompts]}
    refused = httpx.post(teacher_url + "/score", json={**body, "top_k": 1})  # the same 80
    assert_error(refused, 422, param="sequences", says="a response holds at most 50")


@pytest.mark.parametrize(
    "route, body, module, builder",
    [
        (OPENAI, {**OPENAI_GOOD, "prompt_logprobs": 2}, routes_openai, "_prompt_entry"),
        (TRL, TRL_GOOD, routes_trl, "json_response"),
        (TRL, {**TRL_GOOD, "response_format": "binary"}, routes_trl, "binary_response"),
        (OPENAI, OPENAI_GOOD, deps, "load_json"),  # the request's body, as it is read
    ],
    ids=["openai", "trl-json", "trl-binary", "openai-body"],
)
def test_a_response_being_built_holds_up_no_other_request(
    teacher_url, monkeypatch, route, body, module, builder
):
    """A dialect's response is Python objects, seconds of work for a large batch: built on the
    event loop, it held up every other request meanwhile (here: /health, till it timed out)."""
    send = lambda: post(teacher_url, route, body)  # noqa: E731
    answer = held_while_health_answers(monkeypatch, teacher_url, module, builder, send)
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"prompt_logprobs": 25}, "prompt_logprobs"),
        ({"logprobs": 25}, "logprobs"),
        ({"prompt_logprobs": 2, "logprobs": 25}, "logprobs"),
    ],
)
def test_openai_top_k_over_the_limit_names_the_field_asked(teacher_url, fields, named):
    r = post(teacher_url, OPENAI, {**OPENAI_GOOD, **fields})
    assert_error(r, 400, param=named, says=f"{named} 25 exceeds this server's max_top_k 20")


@pytest.mark.parametrize(
    "fields",
    [
        {"skip_special_tokens": True, "ignore_eos": False, "min_tokens": 0, "priority": 0},
        {"top_p": None, "presence_penalty": None, "frequency_penalty": None, "echo": True},
        {"return_tokens_as_token_ids": False, "stop_token_ids": [], "length_penalty": 1.0},
    ],
)
def test_openai_fields_at_vllms_defaults_or_null_are_taken(teacher_url, fields):
    # A typed client sends every field it knows, at its default: none of them changes anything.
    plain = post(teacher_url, OPENAI, OPENAI_GOOD)
    r = post(teacher_url, OPENAI, {**OPENAI_GOOD, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain.json()["choices"]


def test_openai_one_new_token_from_a_server_without_top_k_names_max_tokens():
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), max_top_k=0))
    with serve(app) as url:
        r = post(url, OPENAI, {"prompt": [1, 21, 18, 5], "max_tokens": 1})
        assert_error(r, 400, param="max_tokens", says="this server's max_top_k is 0")
        assert post(url, OPENAI, OPENAI_GOOD).status_code == 200  # scoring the prompt still works


@pytest.mark.parametrize(
    "body, param, says",
    [
        # Checked even when no log-probs are asked for, as vLLM checks every prompt.
        ({"prompt": [1, 99], "max_tokens": 0}, "prompt", "token id 99 is out of range"),
        ({"prompt": [1] * 600, "max_tokens": 0}, "prompt", "600 tokens; this server's max_seq_len"),
        ({**OPENAI_GOOD, "prompt": [[1, 2], [2, 99]]}, "prompt.1", "prompt.1: token id 99"),
        ({**OPENAI_GOOD, "prompt": [[2, 99]]}, "prompt.0", "prompt.0: token id 99"),
        # A bad prompt is judged in the form it has, and named without pydantic's type names.
        ({**OPENAI_GOOD, "prompt": [1, -1]}, "prompt.1", "greater than or equal to 0"),
        ({**OPENAI_GOOD, "prompt": [[1], [2, -3]]}, "prompt.1.1", "greater than or equal to 0"),
        ({**OPENAI_GOOD, "prompt": [[1], "a"]}, "prompt.1", "valid list"),
        ({**OPENAI_GOOD, "prompt": [1, "a"]}, "prompt", "token ids are integers"),
    ],
)
def test_openai_prompts_are_checked_and_named_as_sent(teacher_url, body, param, says):
    assert_error(post(teacher_url, OPENAI, body), 400, param=param, says=says)


@pytest.mark.parametrize(
    "fields, param, says",
    [
        # The first sequence has nothing to score, so it must still count in the index.
        ({"sequences": [[1, 2], [1, 21, 99]], "prompt_lengths": [2, 2]}, "sequences.1", "id 99"),
        ({"sequences": [[1, 2], [1, 99]], "prompt_lengths": [1, 2]}, "sequences.1", "id 99"),
        ({"sequences": [[1] * 600], "prompt_lengths": [3]}, "sequences.0", "max_seq_len"),
        ({"prompt_lengths": [3, 3]}, "prompt_lengths", "1 sequences but 2 prompt_lengths"),
        ({"prompt_lengths": [0]}, "prompt_lengths.0", "is 0; it must be between 1 and"),
        ({"prompt_lengths": [6]}, "prompt_lengths.0", "the sequence length 5"),
    ],
)
def test_trl_sequences_are_checked_and_named_as_sent(teacher_url, fields, param, says):
    assert_error(post(teacher_url, TRL, {**TRL_GOOD, **fields}), 400, param=param, says=says)


@pytest.mark.parametrize(
    "route, fields, param",
    [
        # true would count as 1: a prompt length one off, or log-probs nobody asked for.
        (TRL, {"prompt_lengths": [True]}, "prompt_lengths.0"),
        (TRL, {"top_logprobs": "3"}, "top_logprobs"),
        (TRL, {"top_logprobs": 2.0}, "top_logprobs"),
        (OPENAI, {"logprobs": True}, "logprobs"),
        (OPENAI, {"max_tokens": True}, "max_tokens"),
        (OPENAI, {"prompt_logprobs": "2"}, "prompt_logprobs"),
    ],
)
def test_a_count_that_is_not_an_integer_is_refused_as_on_score(teacher_url, route, fields, param):
    good = TRL_GOOD if route == TRL else OPENAI_GOOD
    assert_error(post(teacher_url, route, {**good, **fields}), 400, param=param, says="integer")


def test_openai_token_id_out_of_range_names_the_prompt(teacher_url):
    r = post(teacher_url, OPENAI, {**OPENAI_GOOD, "prompt": [1, 21, 999]})
    assert_error(r, 400, param="prompt", says="out of range")


@pytest.mark.parametrize("temperature", [-1, float("nan"), float("inf"), 1e-300, 1e39, "0.5", True])
def test_openai_temperature_must_be_greedy_or_a_safe_number(teacher_url, temperature):
    body = json.dumps({**OPENAI_GOOD, "temperature": temperature}).encode()  # NaN, Infinity
    assert_error(post(teacher_url, OPENAI, body), 400, param="temperature")


def test_the_routes_still_answer_good_requests(teacher_url):
    assert post(teacher_url, TRL, TRL_GOOD).status_code == 200
    assert post(teacher_url, OPENAI, OPENAI_GOOD).status_code == 200


def test_openai_max_tokens_left_at_its_default_says_so(teacher_url):
    body = {k: v for k, v in OPENAI_GOOD.items() if k != "max_tokens"}
    r = post(teacher_url, OPENAI, body)
    assert_error(r, 400, param="max_tokens", says="max_tokens=16 (the default when it is not sent)")


@pytest.mark.parametrize("temperature", [1e-40, 1e39, "2"])
def test_trl_temperature_must_be_a_safe_number(teacher_url, temperature):
    body = {**TRL_GOOD, "temperature": temperature}
    assert_error(post(teacher_url, TRL, body), 400, param="temperature")


def test_openai_routes_know_the_model_by_its_folder_name_or_path(teacher_url):
    [model] = httpx.get(teacher_url + "/v1/models").json()["data"]
    assert model["id"] == str(TEACHER_PATH) and model["root"] == str(TEACHER_PATH)
    for name in ("tiny-teacher", str(TEACHER_PATH)):
        answer = post(teacher_url, OPENAI, {**OPENAI_GOOD, "model": name})
        assert answer.status_code == 200 and answer.json()["model"] == str(TEACHER_PATH)
    assert_error(post(teacher_url, OPENAI, {**OPENAI_GOOD, "model": "gpt-4"}), 404, "model")


def test_served_model_names_are_the_only_names_the_openai_routes_take(monkeypatch):
    # Given as compose and vLLM's command line give them: space-separated, in the environment.
    monkeypatch.setenv("OPD_TEACHER_SERVED_MODEL_NAME", "acme/teacher-8b teacher")
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)))) as url:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["acme/teacher-8b", "teacher"]
        assert {c["root"] for c in cards} == {str(TEACHER_PATH)}
        for name in ("acme/teacher-8b", "teacher"):
            answer = post(url, OPENAI, {**OPENAI_GOOD, "model": name})
            assert answer.status_code == 200 and answer.json()["model"] == "acme/teacher-8b"
        refused = post(url, OPENAI, {**OPENAI_GOOD, "model": "tiny-teacher"})
        assert_error(refused, 404, "model", says="is 'acme/teacher-8b' (also 'teacher')")
        assert post(url, OPENAI, {**OPENAI_GOOD, "model": ""}).status_code == 200  # as vLLM


@pytest.mark.parametrize(("given", "names"), [("", []), ("  a  b a ", ["a", "b"])])
def test_served_model_names_from_the_environment_are_split_once_each_and_empty_means_none(
    monkeypatch, given, names
):
    monkeypatch.setenv("OPD_TEACHER_SERVED_MODEL_NAME", given)
    assert TeacherSettings().served_model_name == names


@pytest.mark.parametrize(
    "route, fields, param",
    [
        (OPENAI, {"prompt": [[-1]] * 200_000}, "prompt.0.0"),
        (TRL, {"sequences": [[-1]] * 200_000, "prompt_lengths": [1]}, "sequences.0.0"),
        (TRL, {"prompt_lengths": [-1] * 200_000}, "prompt_lengths.0"),
    ],
)
def test_a_body_of_many_bad_items_is_one_error_not_one_per_item(teacher_url, route, fields, param):
    """pydantic would build an error object for each bad item: seconds and GBs for a body within
    the size limit, all on the event loop. The first bad item of each list is all that is said."""
    good = TRL_GOOD if route == TRL else OPENAI_GOOD
    r = post(teacher_url, route, {**good, **fields})
    assert_error(r, 400, param=param)
    assert "more)" not in r.json()["error"]["message"]


class RulesOutTokens(HFBackend):
    """The hf backend, except that every scored token's log-prob is -inf (the model rules it out),
    as fp16 overflow or the vllm backend's NaN handling can give."""

    def score_batch(self, jobs):
        scores = super().score_batch(jobs)
        for score in scores:
            score.logprobs[:] = -np.inf
        return scores


def test_a_token_the_model_rules_out_has_vllms_floor_not_null_or_infinity():
    """vLLM sends -9999.0; TRL's client does arithmetic on it, so null or -Infinity breaks it, and
    strict JSON parsers refuse -Infinity (/score's JSON form too)."""
    settings = TeacherSettings(model=str(TEACHER_PATH))
    with serve(create_app(settings, backend=RulesOutTokens(str(TEACHER_PATH)))) as url:
        body = {"sequences": [{"prompt_ids": [1, 21], "completion_ids": [18, 5]}]}
        score = strict_json(post(url, "/score", body).content)["results"][0]
        trl = post(url, TRL, {**TRL_GOOD, "top_logprobs": 0}).json()
        body = {"prompt": [1, 21, 18, 5], "max_tokens": 0, "prompt_logprobs": 0}
        openai = post(url, OPENAI, {**body, "echo": True, "logprobs": 0}).json()["choices"][0]
    assert score["logprobs"] == [-9999.0, -9999.0]
    assert trl["logprobs"][0] == [[-9999.0], [-9999.0]]
    assert openai["logprobs"]["token_logprobs"][1:] == [-9999.0] * 3
    assert [e[str(t)]["logprob"] for e, t in zip(openai["prompt_logprobs"][1:], [21, 18, 5])] == [
        -9999.0
    ] * 3


@pytest.mark.parametrize(
    "fields",
    [{"top_k": -1}, {"top_k": 0}, {"min_p": 0.0}, {"repetition_penalty": 1.0}, {"stop": []}]
    + [{"logit_bias": {}}, {"best_of": 1}, {"top_p": 1.0}, {"stream": False}, {"stream": None}]
    # What a client dumping vLLM's own request model sends: labels, and null for unused features.
    + [{"user": "alice"}, {"request_id": "cmpl-1"}, {"cache_salt": "s"}, {"response_format": None}]
    + [{"guided_json": None}, {"structured_outputs": None}, {"vllm_xargs": None}],
)
def test_openai_options_at_a_value_that_changes_nothing_are_taken(teacher_url, fields):
    """vLLM-style clients send their ways of saying "off"; only a value with an effect is refused."""
    assert post(teacher_url, OPENAI, {**OPENAI_GOOD, **fields}).status_code == 200


def test_a_next_token_that_ends_the_sequence_is_a_stop_left_out_of_the_text(teacher, teacher_url):
    """As vLLM answers: a script that branches on finish_reason must see that the teacher would end
    here, and the <eos> is not written into the text."""
    tokenizer = teacher[1]
    problem = problems("eval", 1)[0]
    solved = tokenizer(problem.prompt + problem.target)["input_ids"]  # <bos> + text, no <eos>
    body = {"prompt": solved, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    end = post(teacher_url, OPENAI, body).json()["choices"][0]
    assert end["token_ids"] == [tokenizer.eos_token_id]
    assert end["finish_reason"] == "stop" and end["text"] == ""
    going = post(teacher_url, OPENAI, {**body, "prompt": solved[:-3]}).json()["choices"][0]
    assert going["finish_reason"] == "length" and going["text"] == tokenizer.decode(solved[-3:-2])


def test_a_next_token_generation_config_lists_as_an_eos_is_a_stop_naming_it(
    teacher, teacher_url, tmp_path
):
    """vLLM stops at every eos id a model's generation_config.json lists, giving the id as the
    stop_reason (Qwen lists <|endoftext|> beside its tokenizer's <|im_end|>): a teacher whose
    config lists the token it would write next stops there."""
    tokenizer = teacher[1]
    problem = problems("eval", 1)[0]
    prompt = tokenizer(problem.prompt + problem.target)["input_ids"][:-3]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    [token] = post(teacher_url, OPENAI, body).json()["choices"][0]["token_ids"]
    model = tmp_path / "teacher"
    shutil.copytree(TEACHER_PATH, model)
    config = json.loads((model / "generation_config.json").read_text())
    eos = [tokenizer.eos_token_id, token]
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    with serve(create_app(TeacherSettings(model=str(model)))) as url:
        choice = post(url, OPENAI, body).json()["choices"][0]
    assert choice["token_ids"] == [token] and choice["text"] == ""
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == token


def test_openai_log_prob_entries_put_the_actual_token_first_as_vllm_does(teacher_url):
    # vLLM builds each position's entries from the actual token, then the top-k by rank; a client
    # may read the first entry as the token's own.
    body = {**OPENAI_GOOD, "logprobs": 3, "prompt_logprobs": 3, "return_token_ids": True}
    choice = post(teacher_url, OPENAI, body).json()["choices"][0]
    prompt = OPENAI_GOOD["prompt"]
    for t, entry in enumerate(choice["prompt_logprobs"][1:]):
        first, *rest = entry.items()
        assert first[0] == str(prompt[t + 1])
        assert [v["rank"] for _, v in rest] == sorted(v["rank"] for _, v in rest)
    logprobs = choice["logprobs"]
    for token, logprob, top in zip(
        logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
    ):
        assert next(iter(top.items())) == (token, logprob)


def test_openai_tokens_as_token_ids_name_each_token_by_its_id_as_vllm_does(teacher_url):
    body = {**OPENAI_GOOD, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    plain = post(teacher_url, OPENAI, body).json()["choices"][0]["logprobs"]
    got = post(teacher_url, OPENAI, {**body, "return_tokens_as_token_ids": True}).json()
    ids = got["choices"][0]["logprobs"]
    assert ids["tokens"][:-1] == [f"token_id:{t}" for t in OPENAI_GOOD["prompt"]]
    assert (
        ids["tokens"][-1].startswith("token_id:") and ids["tokens"][-1] in ids["top_logprobs"][-1]
    )
    assert ids["token_logprobs"] == plain["token_logprobs"]
    for named, texts in zip(ids["top_logprobs"][1:], plain["top_logprobs"][1:]):
        assert all(key.startswith("token_id:") for key in named)
        assert sorted(named.values()) == sorted(texts.values())
    # Offsets count the characters of what is written, as vLLM's do.
    assert ids["text_offset"] == list(np.cumsum([0] + [len(t) for t in ids["tokens"][:-1]]))


@pytest.mark.parametrize(
    "fields, param",
    [({"top_k": 5}, "top_k"), ({"top_p": True}, "top_p"), ({"stop": ["\n"]}, "stop")],
)
def test_openai_options_with_an_effect_are_refused_naming_them(teacher_url, fields, param):
    assert_error(post(teacher_url, OPENAI, {**OPENAI_GOOD, **fields}), 400, param=param)


@pytest.mark.parametrize("route", [TRL, OPENAI])
def test_the_dialects_wait_for_room_in_a_full_queue_as_vllm_queues(route):
    """TRL sends its chunks at once and retries a 429 only thrice: a full queue holds a dialect
    request until there is room (as /score/stream does), where /score answers 429 at once."""
    backend = GatedBackend(str(TEACHER_PATH), max_queue_tokens=20)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    ids = [1] + [21] * 9  # 10 tokens: 15 + 10 > 20
    body = {**TRL_GOOD, "sequences": [ids]} if route == TRL else {**OPENAI_GOOD, "prompt": ids}
    with serve(app) as url:
        score = {"sequences": [{"prompt_ids": [1] * 10, "completion_ids": [5] * 5}]}
        first = threading.Thread(target=httpx.post, args=(url + "/score",), kwargs={"json": score})
        first.start()
        wait_for(backend.running.is_set)  # the first batch holds the worker
        queued = threading.Thread(target=httpx.post, args=(url + "/score",), kwargs={"json": score})
        queued.start()
        wait_for(lambda: backend.queue_depth() == 1)  # 15 of 20 tokens queued
        as_score = {"sequences": [{"prompt_ids": ids[:5], "completion_ids": ids[5:]}]}
        assert post(url, "/score", as_score).status_code == 429
        answer = {}
        waiting = threading.Thread(target=lambda: answer.update(r=post(url, route, body)))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()  # waiting for room, not refused
        backend.gate.set()
        for thread in (first, queued, waiting):
            thread.join(timeout=60)
    assert answer["r"].status_code == 200, answer["r"].text


def reference(url, seqs, k):
    with TeacherClient(url) as client:
        return client.score(seqs, top_k=k).results


@pytest.mark.parametrize("response_format", ["binary", "json"])
def test_trl_sequence_logprobs_route(teacher_url, seqs, response_format):
    """The route of `trl vllm-serve` (TRL before 1.16 calls it), in both response forms."""
    import base64

    body = {
        "sequences": [p + c for p, c in seqs],
        "prompt_lengths": [len(p) for p, _ in seqs],
        "top_logprobs": 5,
        "temperature": 1.0,
        "response_format": response_format,
    }
    out = httpx.post(teacher_url + "/get_sequence_logprobs/", json=body).json()
    refs = reference(teacher_url, seqs, 5)
    if response_format == "binary":
        shape = out["shape"]
        lp = np.frombuffer(base64.b64decode(out["logprobs_b64"]), "<f4").reshape(shape)
        actual = np.frombuffer(base64.b64decode(out["actual_logprobs_b64"]), "<f4")
        actual = actual.reshape(shape[0], shape[1], 1)
        for i, ref in enumerate(refs):
            n = out["completion_lengths"][i]
            np.testing.assert_allclose(lp[i, :n], ref.topk_logprobs, **TOL)
            np.testing.assert_allclose(actual[i, :n, 0], ref.logprobs, **TOL)
            assert np.all(np.isneginf(lp[i, n:]))
    else:
        for i, ref in enumerate(refs):
            for t, row in enumerate(out["logprobs"][i]):
                np.testing.assert_allclose(row[:5], ref.topk_logprobs[t], **TOL)
