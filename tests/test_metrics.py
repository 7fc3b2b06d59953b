"""/metrics scraped over HTTP from a real engine on CPU: counters move by exactly what the engine did, the
per-stage metrics of a 2-stage Ray pipeline are there, and every dashboard query names a real metric."""

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.metrics import STATS_MIN_INTERVAL_S
from mlapipe.runtime.tiny_models import write_tiny_model

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "mlapipe-dashboard.json"
# Different prompt and output lengths, so a counter that counts requests instead of tokens shows.
PROMPTS = [list(range(5, 12)), [40, 41, 42], list(range(60, 80))]
MAX_TOKENS = [5, 1, 3]
STAGE_METRICS = [
    "mlapipe:stage_forward_seconds_total",
    "mlapipe:stage_transport_wait_seconds_total",
    "mlapipe:stage_bytes_sent_total",
    "mlapipe:stage_micro_batches_total",
    "mlapipe:stage_micro_batches_in_flight",
    "mlapipe:stage_kv_blocks_used",
    "mlapipe:stage_amb_steps_total",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("metrics") / "v2.gguf", "v2", num_hidden_layers=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def run_requests(engine: Engine) -> list:
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
        for p, n in zip(PROMPTS, MAX_TOKENS)
    ]
    done = {}
    while len(done) < len(ids):
        done.update((r.request_id, r) for r in engine.step()[1])
    return [done[i] for i in ids]


def check_request_counters(scraped: dict, requests: list) -> None:
    lengths = [len(r.output_token_ids) for r in requests]
    assert lengths == MAX_TOKENS
    n = len(requests)
    assert value(scraped, "mlapipe:generation_tokens_total") == sum(lengths)
    assert value(scraped, "mlapipe:prompt_tokens_total") == sum(len(p) for p in PROMPTS)
    assert value(scraped, "mlapipe:request_success_total", finished_reason="length") == n
    assert value(scraped, "mlapipe:time_to_first_token_seconds_count") == n
    assert value(scraped, "mlapipe:inter_token_latency_seconds_count") == sum(lengths) - n
    assert value(scraped, "mlapipe:e2e_request_latency_seconds_count") == n
    inf_bucket = value(scraped, "mlapipe:e2e_request_latency_seconds_bucket", le="+Inf")
    assert inf_bucket == n
    assert value(scraped, "mlapipe:num_requests_running") == 0
    assert value(scraped, "mlapipe:num_requests_waiting") == 0
    assert value(scraped, "mlapipe:kv_cache_usage_perc") == 0  # every finished request freed its blocks


def test_local_engine_counters_match_what_ran(model_path):
    port = free_port()
    with Engine(model_path, block_size=16, ubatch=4, metrics_port=port) as engine:
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=2))
        queued = samples(scrape(port))  # nothing stepped yet: one waiting, no prompt token processed
        assert value(queued, "mlapipe:num_requests_waiting") == 1
        assert value(queued, "mlapipe:prompt_tokens_total") == 0
        engine.step()  # the first 4-token chunk of the 7-token prompt
        assert value(samples(scrape(port)), "mlapipe:prompt_tokens_total") == 4
        while engine.scheduler.has_unfinished:
            engine.step()
        assert value(samples(scrape(port)), "mlapipe:prompt_tokens_total") == len(PROMPTS[0])
        with Engine(model_path, block_size=16, metrics_port=0) as fresh:  # its own registry and port
            requests = run_requests(fresh)
            check_request_counters(samples(scrape(fresh.metrics.port)), requests)
        engine.score(PROMPTS[2])
        time.sleep(STATS_MIN_INTERVAL_S)  # stage stats are re-polled at most this often
        scraped = samples(scrape(port))
    assert value(scraped, "mlapipe:request_success_total", finished_reason="length") == 1
    assert value(scraped, "mlapipe:request_success_total", finished_reason="scored") == 1
    assert value(scraped, "mlapipe:generation_tokens_total") == 2  # the other engine's tokens not here
    assert value(scraped, "mlapipe:stage_forward_seconds_total", stage="0") > 0
    assert value(scraped, "mlapipe:stage_micro_batches_in_flight", stage="0") == 0
    with pytest.raises(OSError):
        scrape(port)  # close() stopped the server and freed the port


def test_metrics_port_option_reaches_the_engine(tmp_path):
    from mlapipe.runtime import cli

    prompts = tmp_path / "in.jsonl"
    prompts.write_text("")
    files = ["batch", "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"), "--demo"]
    args = cli.build_parser().parse_args(files)
    assert "metrics_port" not in cli.engine_options(args)
    args = cli.build_parser().parse_args(files + ["--metrics-port", "9400", "--no-progress"])
    assert cli.engine_options(args) == {"metrics_port": 9400, "progress": False}
    args = cli.build_parser().parse_args(
        files + ["--metrics-port", "9400", "--metrics-host", "0.0.0.0", "--transport-tls", "c.pem,k.pem,ca.pem"]
    )
    assert cli.engine_options(args) == {
        "metrics_port": 9400,
        "metrics_host": "0.0.0.0",
        "transport_tls": "c.pem,k.pem,ca.pem",
    }


@pytest.fixture(scope="module")
def pipeline_scrape(model_path, ray_local):
    """A 2-stage Ray pipeline's /metrics after three requests. Naive attention everywhere, so every
    micro-batch takes amb head steps on both stages."""
    port = free_port()
    with Engine(
        model_path, pipeline=2, use_ray=True, block_size=16, metrics_port=port, attention="naive"
    ) as engine:
        requests = run_requests(engine)
        submitted = engine.metrics.batches_submitted
        text = scrape(port)
    return text, requests, submitted


def test_pipeline_stage_metrics(pipeline_scrape):
    text, requests, submitted = pipeline_scrape
    scraped = samples(text)
    check_request_counters(scraped, requests)
    for stage in ("0", "1"):
        for name in STAGE_METRICS:
            assert (name, (("stage", stage),)) in scraped, (name, stage)
        assert value(scraped, "mlapipe:stage_forward_seconds_total", stage=stage) > 0
        assert value(scraped, "mlapipe:stage_micro_batches_total", stage=stage) == submitted
        assert value(scraped, "mlapipe:stage_micro_batches_in_flight", stage=stage) == 0
        assert value(scraped, "mlapipe:stage_amb_steps_total", stage=stage) >= submitted  # >= 1 per batch
        assert value(scraped, "mlapipe:stage_kv_blocks_used", stage=stage) == 0
    sent_forward = value(scraped, "mlapipe:stage_bytes_sent_total", stage="0")  # activations crossed
    sent_back = value(scraped, "mlapipe:stage_bytes_sent_total", stage="1")  # decode-round tokens only
    assert sent_forward > 0 and 0 < sent_back < sent_forward and sent_back % 8 == 0
    assert value(scraped, "mlapipe:stage_transport_wait_seconds_total", stage="1") > 0


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_every_dashboard_query_names_a_scraped_metric(pipeline_scrape):
    text, _, _ = pipeline_scrape
    scraped_names = {name for name, _ in samples(text)}
    queries = dashboard_queries()
    assert len(queries) >= 10
    named = set()
    for expr in queries:
        names = re.findall(r"mlapipe:[A-Za-z0-9_:]+", expr)
        assert names, f"query names no mlapipe metric: {expr}"
        named.update(names)
    # Sample names as scraped (histograms as _bucket/_sum/_count, counters with _total), so a query
    # must name exactly what Prometheus stores.
    missing = sorted(named - scraped_names)
    assert not missing, f"dashboard queries name metrics the engine does not export: {missing}"
    for required in (
        "mlapipe:generation_tokens_total",
        "mlapipe:time_to_first_token_seconds_bucket",
        "mlapipe:inter_token_latency_seconds_bucket",
        "mlapipe:num_requests_running",
        "mlapipe:num_requests_waiting",
        "mlapipe:kv_cache_usage_perc",
        "mlapipe:stage_forward_seconds_total",
        "mlapipe:stage_transport_wait_seconds_total",
    ):
        assert required in named, f"the dashboard has no panel on {required}"
    assert any("histogram_quantile" in q for q in queries)
