"""The hosted-API client against a local server speaking BFL's and Oxen's protocols (flux2kit.testing.hosted_api).

Each scenario asserts the outcome, how many times the job was submitted (paid for), and that the
API key appeared only in the auth header: in no URL, body or other header of any recorded request,
in no log line, exception text or output.
"""

import io
import logging
import re
import socket
import threading

import pytest
from PIL import Image

from flux2kit.pipelines.hosted import providers as P
from flux2kit.pipelines.hosted.errors import ApiError, Cancelled, UnknownStateError
from flux2kit.pipelines.hosted.jobs import JobRunner, RetryPolicy

from flux2kit.testing.hosted_api import ApiServer, ManualClock, seed_of_color, silent_listener

KEY = "sk-test-0123456789abcdef-SECRET"
AUTH = {"bfl": "x-key", "oxen": "Authorization"}
FAST = dict(first_poll_delay=0.0, poll_interval=0.01, max_poll_interval=0.02, retry_delay=0.01, max_retry_delay=0.02,
            jitter=0.2, deadline=5.0, connect_timeout=2.0, read_timeout=5.0, cancel_check=0.01)


@pytest.fixture(scope="module")
def server():
    with ApiServer(key=KEY) as s:
        yield s


@pytest.fixture
def api(server, caplog):
    caplog.set_level(logging.DEBUG, logger="flux2kit")
    log = logging.getLogger("flux2kit")

    def run(provider="bfl", scenario=None, *, batch=1, limit=4, policy=None, cancel=None, model=None, mode="sync",
            images=(), base=None, clock=None, **request):
        server.reset(scenario)
        base = base or (server.url if provider == "bfl" else server.url + "/api/ai")
        prov = P.make_provider(provider, model or ("flux-2-pro"), base, mode=mode)
        request = {"prompt": "a red fox", "width": 64, "height": 64, "seed": 40, **request}
        req = P.Request(batch_size=batch, images=list(images), **request)
        plan = prov.plan(req)
        runner = JobRunner(prov, KEY, policy=RetryPolicy(**{**FAST, **(policy or {})}), limit=limit,
                           should_cancel=cancel, log=log.info, **({"clock": clock} if clock else {}))
        return runner.run(plan.jobs)

    return run


def check_key_only_in_auth(server, provider, *texts, caplog=None):
    header = AUTH[provider].lower()
    for r in server.requests:
        assert KEY not in r["path"]
        assert KEY.encode() not in r["body"]
        for name, value in r["headers"].items():
            if name.lower() != header:
                assert KEY not in value, (name, r["path"])
        if r["path"].startswith("/results/") and provider == "bfl":
            assert header not in {k.lower() for k in r["headers"]}, "the key went to the signed result URL"
    for text in texts:
        assert KEY not in str(text)
    if caplog is not None:
        assert KEY not in caplog.text


def submits(server):
    return len(server.submissions())


def colors(results):
    return [seed_of_color(Image.open(io.BytesIO(r.image_bytes)).convert("RGB").getpixel((0, 0))) for r in results]


# -- outcomes, both providers -----------------------------------------------------------------------

@pytest.mark.parametrize("provider,mode", [("bfl", "sync"), ("oxen", "queue"), ("oxen", "sync")])
def test_success(api, server, caplog, provider, mode):
    results = api(provider, {"poll": ["Pending", "Ready"]}, mode=mode)
    assert len(results) == 1 and colors(results) == [40]
    assert submits(server) == 1
    assert results[0].request_id or mode == "sync"
    assert server.requests[0]["headers"].get(AUTH[provider] if provider == "bfl" else "Authorization") == (
        KEY if provider == "bfl" else f"Bearer {KEY}")
    if provider == "bfl":
        assert results[0].cost_usd == pytest.approx(0.045)  # the server's "cost": 4.5 credits
    check_key_only_in_auth(server, provider, results, caplog=caplog)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_slow_success(api, server, caplog, provider):
    statuses = ["Pending"] * 6 + ["Generating"] * 4 + ["Ready"]
    results = api(provider, {"poll": statuses}, mode="queue")
    assert colors(results) == [40] and submits(server) == 1
    polls = [r for r in server.requests if r["method"] == "GET" and not r["path"].startswith("/results/")]
    assert len(polls) == len(statuses)
    check_key_only_in_auth(server, provider, results, caplog=caplog)


@pytest.mark.parametrize("status,words", [
    ("Request Moderated", ["Request Moderated", "prompt or a reference", "safety_tolerance"]),
    ("Content Moderated", ["Content Moderated", "generated image was flagged", "safety_tolerance"]),
    ("Error", ["failed with status 'Error'", "Try again"]),
    ("Task not found", ["Task not found", "run again"]),
])
def test_bfl_final_failures_say_which_and_what_to_do(api, server, caplog, status, words):
    with pytest.raises(ApiError) as e:
        api("bfl", {"poll": ["Pending", status]})
    for w in words:
        assert w in str(e.value), str(e.value)
    assert e.value.request_id and e.value.request_id in str(e.value)
    assert submits(server) == 1
    assert not any(r["path"].startswith("/results/") for r in server.requests)
    check_key_only_in_auth(server, "bfl", e.value, caplog=caplog)


def test_oxen_moderation_and_error(api, server, caplog):
    with pytest.raises(ApiError, match=r"failed: NSFW content detected.*rephrase the prompt") as e:
        api("oxen", {"poll": ["Pending", "Content Moderated"]}, mode="queue")
    assert submits(server) == 1
    check_key_only_in_auth(server, "oxen", e.value, caplog=caplog)
    with pytest.raises(ApiError, match=r"failed: internal error\. Try again"):
        api("oxen", {"poll": ["Error"]}, mode="queue")
    assert submits(server) == 1


@pytest.mark.parametrize("provider,status", [("bfl", 429), ("bfl", 503), ("oxen", 429), ("oxen", 503)])
def test_busy_then_success_resubmits(api, server, caplog, provider, status):
    results = api(provider, {"submit": [status, status, "ok"]}, mode="queue")
    assert colors(results) == [40]
    assert submits(server) == 3  # two refusals (not accepted, nothing charged), then the one that ran
    check_key_only_in_auth(server, provider, results, caplog=caplog)


def test_always_busy_gives_up_with_nothing_charged(api, server):
    with pytest.raises(ApiError, match=r"not accepted after 3 attempts.*Nothing was charged.*max_concurrent"):
        api("bfl", {"submit": [429]}, policy={"submit_attempts": 3})
    assert submits(server) == 3


def test_poll_429_and_5xx_are_retried(api, server, caplog):
    results = api("bfl", {"poll": ["Pending", 503, 429, 500, "malformed", "Ready"]})
    assert colors(results) == [40] and submits(server) == 1
    check_key_only_in_auth(server, "bfl", results, caplog=caplog)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_malformed_submit_answer_reports_unknown_state(api, server, caplog, provider):
    with pytest.raises(UnknownStateError, match=r"unreadable.*may have been accepted and charged.*NOT sent again") as e:
        api(provider, {"submit": ["malformed", "ok"]}, mode="queue")
    assert submits(server) == 1
    assert ("dashboard.bfl.ai" if provider == "bfl" else "oxen.ai") in str(e.value)
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


@pytest.mark.parametrize("provider,mode", [("bfl", "sync"), ("oxen", "sync"), ("oxen", "queue")])
def test_connection_reset_after_sending_reports_unknown_state(api, server, caplog, provider, mode):
    with pytest.raises(UnknownStateError, match=r"dropped after the request was sent.*NOT sent again") as e:
        api(provider, {"submit": ["reset", "ok"]}, mode=mode)
    assert submits(server) == 1
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


def test_submit_500_is_not_resubmitted(api, server):
    with pytest.raises(UnknownStateError, match=r"answered 500.*not certain the job was refused"):
        api("bfl", {"submit": [500, "ok"]})
    assert submits(server) == 1


def test_refused_connection_is_retried_then_reported(api, server, caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    with pytest.raises(ApiError, match=r"not accepted after 3 attempts \(could not connect to 127\.0\.0\.1.*Nothing was charged") as e:
        api("bfl", base=f"http://127.0.0.1:{port}", policy={"submit_attempts": 3})
    assert submits(server) == 0
    check_key_only_in_auth(server, "bfl", e.value, caplog=caplog)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_result_url_404_says_expired(api, server, caplog, provider):
    with pytest.raises(ApiError, match=r"result of request \w+ is gone \(HTTP 404.*expire.*run the job again") as e:
        api(provider, {"result": 404}, mode="queue")
    assert e.value.kind == "expired" and submits(server) == 1
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_never_finishes_stops_at_the_deadline(api, server, caplog, provider):
    with pytest.raises(ApiError, match=r"still '(Pending|queued)' when the deadline of 0.3 s passed.*may still finish") as e:
        api(provider, {"poll": "never"}, mode="queue", policy={"deadline": 0.3})
    assert e.value.kind == "deadline" and submits(server) == 1
    polls = [r for r in server.requests if r["method"] == "GET"]
    assert polls and not any(r["path"].startswith("/results/") for r in server.requests)
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_cancel_mid_poll_stops_promptly(api, server, caplog, provider):
    flag = threading.Event()

    def cancel_after_polls():
        polls = [r for r in server.requests if r["method"] == "GET"]
        if len(polls) >= 3:
            flag.set()
        return flag.is_set()

    with pytest.raises(Cancelled):
        api(provider, {"poll": "never"}, mode="queue", cancel=cancel_after_polls, policy={"deadline": 30.0})
    polls = [r for r in server.requests if r["method"] == "GET"]
    assert 3 <= len(polls) <= 4  # at most the poll already in flight when Cancel was seen
    assert submits(server) == 1
    check_key_only_in_auth(server, provider, caplog=caplog)


def test_http_errors_say_what_to_do(api, server, caplog):
    with pytest.raises(ApiError, match=r"HTTP 402.*no credits left.*Add credits.*Nothing was charged") as e:
        api("bfl", {"submit": [402]})
    assert e.value.kind == "credits" and submits(server) == 1
    with pytest.raises(ApiError, match=r"HTTP 403.*API key is missing, wrong or revoked.*BFL_API_KEY"):
        api("bfl", {"submit": [403]})
    with pytest.raises(ApiError, match=r"HTTP 422\): .*width.*too large.*Fix the input"):
        api("bfl", {"submit": [422]})
    check_key_only_in_auth(server, "bfl", caplog=caplog)
    with pytest.raises(ApiError, match=r"OXEN_API_KEY"):
        api("oxen", {"submit": [403]})


def test_wrong_key_is_never_echoed(server):
    server.reset({})
    prov = P.make_provider("bfl", "flux-2-pro", server.url)
    plan = prov.plan(P.Request(prompt="x", width=64, height=64))
    other = "sk-wrong-key-987654321"
    with pytest.raises(ApiError, match="HTTP 403") as e:
        JobRunner(prov, other, policy=RetryPolicy(**FAST)).run(plan.jobs)
    assert other not in str(e.value)


# -- batches ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_batch_uses_seed_plus_i_and_respects_the_concurrency_limit(api, server, caplog, provider):
    results = api(provider, {"poll": ["Pending", "Pending", "Ready"], "hold_until_active": 2, "jobs": 5}, batch=5, limit=2,
                  mode="queue", seed=100)
    assert colors(results) == [100, 101, 102, 103, 104]
    assert [r.seed for r in results] == [100, 101, 102, 103, 104]
    assert submits(server) == 5
    assert server.max_active == 2  # jobs overlapped, but never more than the limit
    sent_seeds = sorted(__import__("json").loads(r["body"])["seed"] for r in server.submissions())
    assert sent_seeds == [100, 101, 102, 103, 104]
    check_key_only_in_auth(server, provider, results, caplog=caplog)


def test_batch_failure_names_the_image_and_stops_new_submits(api, server, caplog):
    with pytest.raises(ApiError, match=r"Image 1 of 4 \(seed 40\): .*HTTP 402") as e:
        api("bfl", {"submit": [402]}, batch=4, limit=1)
    assert submits(server) == 1  # after "no credits" the other three were not sent
    check_key_only_in_auth(server, "bfl", e.value, caplog=caplog)


def test_batch_partial_failure_lists_the_finished_paid_images(api, server, caplog):
    scenario = {"poll": ["Pending", "Ready"], "poll_by_seed": {41: ["Pending", "Content Moderated"]}}
    with pytest.raises(ApiError, match=r"Image 2 of 2 \(seed 41\): .*Content Moderated.*1 other image\(s\) finished "
                                       r"and were charged: request id\(s\) \w+") as e:
        api("bfl", scenario, batch=2, limit=1)
    assert submits(server) == 2
    check_key_only_in_auth(server, "bfl", e.value, caplog=caplog)


# -- requests as sent ---------------------------------------------------------------------------------

def _ref(w, h, color=(200, 10, 10)):
    return Image.new("RGB", (w, h), color)


def test_bfl_request_body(api, server):
    import base64
    import json

    api("bfl", {}, model="flux-2-flex", images=[_ref(2048, 1024), _ref(300, 200, (0, 0, 255))], seed=5,
        num_inference_steps=22, guidance=3.5, output_format="webp", safety_tolerance=4)
    body = json.loads(server.submissions()[0]["body"])
    assert server.submissions()[0]["path"] == "/v1/flux-2-flex"
    assert (body["width"], body["height"], body["seed"], body["steps"], body["guidance"]) == (64, 64, 5, 22, 3.5)
    assert body["output_format"] == "jpeg" and body["safety_tolerance"] == 4
    first = Image.open(io.BytesIO(base64.b64decode(body["input_image"])))
    second = Image.open(io.BytesIO(base64.b64decode(body["input_image_2"])))
    assert first.size[0] * first.size[1] <= 1024 * 1024 and abs(first.size[0] / first.size[1] - 2) < 0.01
    assert second.size == (300, 200) and second.getpixel((5, 5)) == (0, 0, 255)
    assert "input_image_3" not in body


def test_prompt_upsampling_only_where_bfl_takes_it():
    flex = P.BFL("flux-2-flex").plan(P.Request(prompt="a fox", width=64, height=64, prompt_upsampling=True))
    assert flex.jobs[0].body["prompt_upsampling"] is True and not any("prompt_upsampling" in n for n in flex.notes)
    assert P.BFL("flux-2-flex").plan(P.Request(prompt="a fox", width=64, height=64)).jobs[0].body[
        "prompt_upsampling"] is False  # BFL's default is on: flux2kit says off unless asked
    pro = P.BFL("flux-2-pro").plan(P.Request(prompt="a fox", width=64, height=64, prompt_upsampling=True))
    assert "prompt_upsampling" not in pro.jobs[0].body
    assert "prompt_upsampling is not taken by flux-2-pro (only flux-2-flex); not sent" in pro.notes


def test_bfl_pro_sends_no_steps_and_sizes_from_aspect(api, server):
    import json

    server.reset({})
    prov = P.make_provider("bfl", "flux-2-pro", server.url)
    plan = prov.plan(P.Request(prompt="x", aspect_ratio="16:9", resolution="1 MP"))
    assert (plan.width, plan.height) == (1360, 768)
    assert "steps" not in plan.jobs[0].body and "guidance" not in plan.jobs[0].body
    assert any("not used by flux-2-pro" in n for n in plan.notes)
    # [pro]: $0.03 first MP + $0.015 per further output MP and per input MP
    assert plan.estimated_usd == pytest.approx(0.03)
    plan = prov.plan(P.Request(prompt="x", width=2048, height=2048, batch_size=2, images=[_ref(1024, 1024)]))
    assert plan.estimated_usd == pytest.approx(2 * (0.03 + 3 * 0.015 + 0.015))
    with pytest.raises(Exception, match=r"at most 8"):
        prov.plan(P.Request(prompt="x", images=[_ref(64, 64)] * 9))
    with pytest.raises(Exception, match=r"nearest valid size is"):
        prov.plan(P.Request(prompt="x", width=1000, height=1000))
    assert json.loads(prov.submit_request(plan.jobs[0])[2])["seed"] == 0


def test_oxen_request_body(api, server):
    import json

    api("oxen", {}, mode="sync", images=[_ref(100, 80)], aspect_ratio="match_input_image", resolution="4 MP",
        width=0, height=0, output_format="jpeg", output_quality=70, disable_safety_checker=True)
    sub = server.submissions()[0]
    body = json.loads(sub["body"])
    assert sub["path"] == "/api/ai/images/edit"
    assert body["model"] == "flux-2-pro" and body["aspect_ratio"] == "match_input_image"
    assert body["resolution"] == "2 MP"  # Oxen offers 0.5/1/2 MP: 4 MP mapped (and said so)
    assert (body["output_format"], body["output_quality"], body["disable_safety_checker"]) == ("jpg", 70, True)
    assert (body["num_inference_steps"], body["guidance"]) == (30, 2.0)
    assert body["input_image"][0].startswith("data:image/png;base64,")
    assert body["response_format"] == "b64_json"


def test_oxen_exact_size_maps_to_nearest_ratio(server):
    prov = P.make_provider("oxen", "flux-2-pro", server.url + "/api/ai", mode="queue")
    plan = prov.plan(P.Request(prompt="x", width=1360, height=768))
    assert plan.jobs[0].body["aspect_ratio"] == "16:9" and plan.jobs[0].body["resolution"] == "1 MP"
    assert plan.jobs[0].path == "/queue" and plan.jobs[0].body["num_generations"] == 1
    assert plan.estimated_usd is None and "unknown" in plan.pricing_note
    assert any("not an exact size" in n for n in plan.notes)


def test_base_url_override_is_limited_to_trusted_hosts():
    P.make_provider("bfl", "flux-2-pro", "https://api.eu.bfl.ai").check_base_url()
    P.make_provider("bfl", "flux-2-pro", "http://127.0.0.1:9").check_base_url()
    with pytest.raises(Exception, match=r"not a Black Forest Labs host.*FLUX2KIT_API_TRUSTED_HOSTS"):
        P.make_provider("bfl", "flux-2-pro", "https://collector.example.com").check_base_url()
    P.make_provider("bfl", "flux-2-pro", "https://proxy.example.com").check_base_url(["proxy.example.com"])
    with pytest.raises(Exception, match=r"plain http"):
        P.make_provider("oxen", "flux-2-pro", "http://hub.oxen.ai/api/ai").check_base_url()
    prov = P.make_provider("bfl", "flux-2-pro")
    assert prov.trusts("https://api.us.bfl.ai/v1/get_result?id=1") and not prov.trusts("https://evil.example/x")
    with pytest.raises(Exception, match=r"points at collector\.example\.com, which is not an Oxen\.ai host"):
        P.make_provider("oxen", "flux-2-pro", "https://collector.example.com").check_base_url()


def test_a_refused_base_url_names_where_it_came_from():
    env = "the environment variable FLUX2KIT_OXEN_BASE_URL"
    with pytest.raises(Exception, match=r"\(from the environment variable FLUX2KIT_OXEN_BASE_URL\) uses plain http.*"
                                        r"Use https://proxy\.example\.com, or change or unset "
                                        r"FLUX2KIT_OXEN_BASE_URL\.") as e:
        P.make_provider("oxen", "flux-2-pro", "http://proxy.example.com").check_base_url(["proxy.example.com"], source=env)
    assert "base_url input" not in str(e.value)
    with pytest.raises(Exception, match=r"\(from the base_url input\) points at x\.example.*or leave base_url empty"):
        P.make_provider("bfl", "flux-2-pro", "https://x.example").check_base_url()


def test_environment_proxy_is_used_for_provider_hosts(server, monkeypatch):
    """HTTP(S)_PROXY as urllib reads it: here the local server plays the proxy for a non-loopback base URL."""
    for var in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", server.url)
    server.reset({})
    prov = P.make_provider("bfl", "flux-2-pro", "http://bfl-proxy-test.invalid")
    plan = prov.plan(P.Request(prompt="x", width=64, height=64, seed=3))
    assert not prov.trusts("http://bfl-proxy-test.invalid/v1/flux-2-pro")  # no key over plain http...
    monkeypatch.setattr(prov, "trusts", lambda url: True)  # ...but the test proxy only speaks http
    results = JobRunner(prov, KEY, policy=RetryPolicy(**FAST)).run(plan.jobs)
    assert colors(results) == [3]
    first = server.requests[0]
    assert first["path"] == "http://bfl-proxy-test.invalid/v1/flux-2-pro" and first["headers"]["x-key"] == KEY
    assert all(r["path"].startswith("/") for r in server.requests[1:])  # loopback polling/result URLs go direct


# -- review fixes ---------------------------------------------------------------------------------------

def test_loopback_lookalike_host_is_not_trusted_with_the_key():
    """A DNS name starting with "127." is not loopback: a shared workflow must not collect keys with it."""
    from flux2kit.pipelines.hosted.transport import is_loopback

    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1"))
    assert not any(is_loopback(h) for h in ("127.evil.example", "127.0.0.1.nip.io", "localhost.evil.example"))
    for base in ("http://127.evil.example", "https://127.0.0.1.nip.io/v1"):
        with pytest.raises(Exception, match=r"not a Black Forest Labs host"):
            P.make_provider("bfl", "flux-2-pro", base).check_base_url()
    prov = P.make_provider("bfl", "flux-2-pro")
    assert not prov.trusts("https://127.evil.example/v1/get_result?id=1")


def test_key_never_travels_over_plain_http_to_a_remote_host():
    prov = P.make_provider("oxen", "flux-2-pro")
    assert prov.trusts("https://hub.oxen.ai/api/ai/queue/1")
    assert not prov.trusts("http://hub.oxen.ai/api/ai/queue/1")  # e.g. a redirect or polling URL downgraded to http
    assert prov.trusts("http://127.0.0.1:8188/x")


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_unknown_poll_status_keeps_polling(api, server, caplog, provider):
    """A status word the client does not know (providers add them) is not a failure: telling the user to run
    again while the job still runs would charge twice."""
    results = api(provider, {"poll": ["Pending", "Uploading", "Ready"]}, mode="queue")
    assert colors(results) == [40] and submits(server) == 1


def test_refused_poll_does_not_claim_nothing_was_charged(api, server, caplog):
    with pytest.raises(ApiError, match=r"polling request \w+.*accepted and may still be charged") as e:
        api("bfl", {"poll": ["Pending", 400]})
    assert "Nothing was charged" not in str(e.value) and submits(server) == 1


def test_retry_after_zero_still_backs_off():
    from flux2kit.pipelines.hosted.transport import Response

    runner = JobRunner(P.make_provider("bfl", "flux-2-pro"), KEY, policy=RetryPolicy(retry_delay=2.0, max_retry_delay=30.0))
    wait = lambda value: runner._retry_after(Response(429, {"retry-after": value}, b""), 2.0)  # noqa: E731
    assert (wait("0"), wait("-3"), wait("nan"), wait("5"), wait("100"), wait("Wed, 21 Oct 2026")) == (2.0, 2.0, 2.0, 5.0, 30.0, 2.0)


@pytest.mark.parametrize("provider", ["bfl", "oxen"])
def test_deadline_cuts_a_slow_download(api, server, caplog, provider):
    """A result that trickles in (each read within the socket timeout) must not outlast the deadline."""
    import time

    start = time.monotonic()
    with pytest.raises(ApiError, match=r"finished \(and is charged\) but its result could not be downloaded.*"
                                       r"deadline of 1 s") as e:
        api(provider, {"result": "slow"}, mode="queue", policy={"deadline": 1.0})
    assert time.monotonic() - start < 3.0  # the whole answer takes about 10 s
    assert e.value.kind == "deadline" and e.value.request_id and submits(server) == 1
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


def test_cancel_during_a_slow_download_stops_promptly(api, server):
    import time

    def cancel_once_downloading():
        return any(r["path"].startswith("/results/") for r in server.requests)

    start = time.monotonic()
    with pytest.raises(Cancelled, match=r"1 accepted job\(s\) may still finish and be charged: request id\(s\) \w+"):
        api("bfl", {"result": "slow"}, cancel=cancel_once_downloading, policy={"deadline": 30.0})
    assert time.monotonic() - start < 3.0


def test_batch_deadline_names_every_accepted_job(api, server, caplog):
    with pytest.raises(ApiError, match=r"Image 1 of 3 .*deadline.*Other accepted job\(s\) that did not deliver: "
                                       r"request id\(s\) \w+, \w+\.") as e:
        api("bfl", {"poll": "never"}, batch=3, policy={"deadline": 0.5})
    assert submits(server) == 3
    check_key_only_in_auth(server, "bfl", e.value, caplog=caplog)


def test_cancel_names_the_accepted_jobs(api, server):
    flag = threading.Event()

    def cancel_after_polls():
        if sum(r["method"] == "GET" for r in server.requests) >= 4:
            flag.set()
        return flag.is_set()

    with pytest.raises(Cancelled, match=r"2 accepted job\(s\) may still finish and be charged: request id\(s\) \w+, \w+"):
        api("bfl", {"poll": "never"}, batch=2, cancel=cancel_after_polls, policy={"deadline": 30.0})


def test_key_with_a_line_break_is_refused_without_quoting_it(server):
    prov = P.make_provider("bfl", "flux-2-pro", server.url)
    bad = "sk-part-one\nsk-part-two"
    with pytest.raises(ApiError, match=r"line breaks.*Copy it again") as e:
        JobRunner(prov, bad, policy=RetryPolicy(**FAST))
    assert "sk-part" not in str(e.value)


def test_oxen_exact_size_overrides_match_input_image_without_references(server):
    prov = P.make_provider("oxen", "flux-2-pro", server.url + "/api/ai", mode="queue")
    plan = prov.plan(P.Request(prompt="x", aspect_ratio="match_input_image", width=1024, height=1024))
    assert plan.jobs[0].body["aspect_ratio"] == "1:1"


def test_cancel_note_leaves_out_the_delivered_image(api, server):
    def cancel_after_one_result():
        got = any(r["path"].startswith("/results/") for r in server.requests)
        return got and sum(r["method"] == "GET" for r in server.requests) >= 6

    with pytest.raises(Cancelled, match=r"^1 accepted job\(s\) may still finish and be charged: request id\(s\) \w+\.$"):
        api("bfl", {"poll": "never", "poll_by_seed": {40: ["Ready"]}}, batch=2, cancel=cancel_after_one_result,
            policy={"deadline": 30.0})



# -- a submit that gets no answer: the deadline and Cancel bound every phase ------------------------------

SENT_AT = r"sent to 127\.0\.0\.1 at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
# a regression must fail the test, not hang it: the socket timeouts outlast the deadline only by this much
PATIENT = {"deadline": 60.0, "read_timeout": 30.0, "connect_timeout": 30.0}


def _when(condition, action, server):
    """Run ``action`` once ``condition()`` holds (in a helper thread; gives up after 30 s)."""
    server.reset()  # no requests of an earlier test count

    def wait():
        condition()
        action()

    threading.Thread(target=wait, daemon=True).start()


@pytest.mark.parametrize("provider,mode", [("bfl", "sync"), ("oxen", "queue"), ("oxen", "sync")])
def test_submit_without_answer_stops_at_the_deadline(api, server, caplog, provider, mode):
    """The server takes the request and never answers: the deadline (the node's timeout) ends the wait, and the
    message says the job may have been accepted and charged, with what is known (host, time, no request id)."""
    clock = ManualClock()
    _when(server.wait_for_requests, lambda: clock.advance(61.0), server)  # the deadline passes while the submit waits
    with pytest.raises(UnknownStateError) as e:
        api(provider, {"submit": ["black_hole", "ok"]}, mode=mode, clock=clock, policy=PATIENT)
    text = str(e.value)
    assert re.search(r"no answer to the submit before the deadline of 60 s \(the node's timeout\)", text), text
    assert re.search(SENT_AT + r" and no request id came back", text), text
    assert re.search(r"may have been accepted and charged, so it was NOT sent again", text), text
    assert "Cancel or deadline" not in text  # item 3: the deadline is named plainly
    assert ("dashboard.bfl.ai" if provider == "bfl" else "oxen.ai") in text
    assert submits(server) == 1
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


@pytest.mark.parametrize("provider,mode", [("bfl", "sync"), ("oxen", "queue"), ("oxen", "sync")])
def test_cancel_during_a_submit_without_answer_says_it_may_be_charged(api, server, caplog, provider, mode):
    pressed = threading.Event()
    _when(server.wait_for_requests, pressed.set, server)  # Cancel while the sent request waits for its answer
    with pytest.raises(Cancelled) as e:
        api(provider, {"submit": ["black_hole", "ok"]}, mode=mode, cancel=pressed.is_set, policy=PATIENT)
    text = str(e.value)
    assert re.search(r"1 job\(s\) were " + SENT_AT + r" with no answer yet \(no request id\): they may have been "
                     r"accepted and may be charged", text), text
    assert submits(server) == 1
    check_key_only_in_auth(server, provider, e.value, caplog=caplog)


def test_deadline_while_connecting_sends_nothing(api, server):
    """A host that never completes the connection: the deadline stops the connect, and nothing was sent."""
    calls = []

    def clock_now():  # the clock runs on each reading: the deadline passes while the client connects
        calls.append(1)
        return 1000.0 + 10.0 * len(calls)

    clock = ManualClock()
    clock.now = clock_now
    with silent_listener() as url:
        with pytest.raises(ApiError, match=r"deadline of 60 s passed before the job could be submitted \(stopped "
                                           r"while connecting to 127\.0\.0\.1\)\. Nothing was charged") as e:
            api("bfl", base=url, clock=clock, policy=PATIENT)
    assert e.value.kind == "deadline"


def test_cancel_while_connecting_sends_nothing(api, server, caplog):
    asked = []

    def cancel():  # False for the check before the attempt, then Cancel while connect() waits
        asked.append(1)
        return len(asked) > 3

    with silent_listener() as url:
        with pytest.raises(Cancelled) as e:
            api("bfl", base=url, cancel=cancel, policy=PATIENT)
    assert str(e.value) == ""  # nothing was sent, so nothing may be charged
    assert "timed out" not in caplog.text  # Cancel ended the connect, not the socket's own timeout
