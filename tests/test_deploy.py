"""deploy/: the configs parse and name real entry points, and `ray job submit -- mlapipe batch` runs a
tiny model to completion on a Ray head started on loopback."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from mlapipe.runtime import arg_types, cli
from mlapipe.runtime.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def load_yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def parse_mlapipe_command(command: str):
    """The command must run the `mlapipe` console script with arguments its parser accepts."""
    argv = shlex.split(command)
    assert argv[0] == "mlapipe", command
    parser = cli.build_parser()
    # Its paths name files on the cluster, not on this machine: check the arguments, not the files.
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if action.type in (arg_types.existing_file, arg_types.output_file):
                action.type = str
    return parser.parse_args(argv[1:])


def test_console_script_is_runtime_cli():
    (script,) = entry_points(group="console_scripts", name="mlapipe")  # as installed
    assert script.value == "mlapipe.runtime.cli:main"
    assert script.load() is cli.main


def test_prometheus_scrapes_the_metrics_port_the_jobs_use():
    config = load_yaml("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for c in jobs["mlapipe"]["static_configs"] for t in c["targets"]]
    ports = {int(t.rsplit(":", 1)[1]) for t in targets}
    job = load_yaml("rayjob.yaml")
    args = parse_mlapipe_command(job["spec"]["entrypoint"])
    assert args.command == "batch"
    assert ports == {args.metrics_port}
    assert args.metrics_host == "0.0.0.0"  # the pod's Prometheus scrapes the pod address, not loopback
    assert jobs["mlapipe"].get("metrics_path", "/metrics") == "/metrics"
    ray_sd = jobs["ray"]["file_sd_configs"][0]["files"][0]
    assert ray_sd.endswith("prom_metrics_service_discovery.json")  # the file Ray's head writes
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    exposed = {p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert args.metrics_port in exposed
    assert head["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)


def test_rayjob_manifest_runs_mlapipe_batch_on_gpu_workers():
    job = load_yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = parse_mlapipe_command(job["spec"]["entrypoint"])
    assert args.pipeline and args.pipeline > 1
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        int(w["replicas"])
        * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for w in workers
    )
    assert gpus >= args.pipeline  # one GPU per stage


def test_rayjob_serve_manifest_exposes_the_api_through_a_service():
    job, service = yaml.safe_load_all((DEPLOY / "rayjob-serve.yaml").read_text())
    assert job["kind"] == "RayJob" and service["kind"] == "Service"
    args = parse_mlapipe_command(job["spec"]["entrypoint"])
    assert args.command == "serve" and args.pipeline > 1
    assert args.host == "0.0.0.0"  # inside the pod; the default (127.0.0.1) would be unreachable
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    exposed = {p["containerPort"] for p in container["ports"]}
    assert {args.port, args.metrics_port} <= exposed
    assert head["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [args.port]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLAPIPE_API_KEY"]["valueFrom"]  # the key never in the manifest
    # `ray job stop` and pod deletion leave the server its graceful shutdown
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]["value"]) > args.shutdown_timeout
    assert head["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        int(w["replicas"])
        * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for w in workers
    )
    assert gpus >= args.pipeline


def test_cluster_yaml_has_gpu_workers_that_install_mlapipe():
    cluster = load_yaml("ray-cluster.yaml")
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    assert any(t.get("resources", {}).get("GPU", 0) > 0 for t in node_types.values())
    setup = " ".join(cluster["setup_commands"])
    mounted = cluster["file_mounts"]
    assert any(f"pip install -e {path}" in setup for path in mounted), setup
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "mlapipe --help" in dockerfile


def test_grafana_provisioning_points_at_the_dashboard():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((DEPLOY / "grafana/mlapipe-dashboard.json").read_text())
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mlapipe.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in (DEPLOY / "README.md").read_text()


# ray job submit on a loopback head -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: str, env: dict) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` in its own session, with its own temp dir and ports, so it shares
    nothing with the tests' in-process Ray (ray_local). Returns (process, dashboard port)."""
    dashboard_port = free_port()
    command = [
        "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={free_port()}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(os.path.join(temp_dir, "head.log"), "w") as log:
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return head, dashboard_port


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stops only this head. Not `ray stop --force`: that kills every Ray process on the machine,
    ray_local's too. --block makes `ray start` stop its services on SIGTERM; the process group (its own
    session) and any process naming our temp dir catch what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in processes_naming(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def processes_naming(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def job_api(address: str, path: str = "", timeout: float = 10):
    """GET {address}/api/jobs/{path} as JSON (the Ray job server's REST API, what `ray job` calls)."""
    import urllib.request

    with urllib.request.urlopen(f"{address}/api/jobs/{path}", timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_job_server(address: str, head: subprocess.Popen, deadline_s: float = 120) -> None:
    """Until the job API itself answers (a list of jobs), not only the dashboard: on a loaded machine the
    dashboard serves /api/version seconds before its job module and agent take submissions."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            if isinstance(job_api(address, timeout=5), list):
                return
        except (OSError, ValueError):  # refused, reset, closed without response, not JSON yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no Ray job server at {address} within {deadline_s} s")


def submit_job(address: str, job_dir: Path, entrypoint: str, env: dict, attempts: int = 5) -> str:
    """`ray job submit --no-wait` under a fixed submission id. A submission whose connection broke
    ("Remote end closed connection without response") is retried only if the server has no job of that
    id, so the job never runs twice."""
    submission_id = f"mlapipe-test-{os.getpid()}-{time.monotonic_ns()}"
    command = ["ray", "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait"]
    command += ["--working-dir", str(job_dir), "--", *shlex.split(entrypoint)]
    for attempt in range(attempts):
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        if submitted.returncode == 0 or _job_status(address, submission_id) is not None:
            return submission_id
        time.sleep(2 * (attempt + 1))
    raise AssertionError(
        f"ray job submit failed {attempts} times: {submitted.stdout[-2000:]}{submitted.stderr[-2000:]}"
    )


def _job_status(address: str, submission_id: str) -> str | None:
    try:
        return job_api(address, submission_id)["status"]
    except (OSError, ValueError, KeyError):  # 404 (no such job) is an HTTPError, an OSError
        return None


def wait_for_job(address: str, submission_id: str, deadline_s: float = 300) -> tuple[str, str]:
    """(final status, logs); a poll that fails to connect is retried until the deadline."""
    deadline = time.monotonic() + deadline_s
    status = None
    while time.monotonic() < deadline:
        status = _job_status(address, submission_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    try:
        logs = job_api(address, f"{submission_id}/logs")["logs"]
    except (OSError, ValueError, KeyError) as e:
        logs = f"(logs not readable: {e})"
    return status or "UNKNOWN", logs


@pytest.mark.slow
def test_ray_job_submit_runs_mlapipe_batch(tmp_path):
    pytest.importorskip("aiohttp", reason="the Ray job server needs ray[default]")
    if shutil.which("ray") is None or shutil.which("mlapipe") is None:
        pytest.skip("needs the ray and mlapipe commands on PATH")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_tiny_model(job_dir / "tiny.gguf", "v2", num_hidden_layers=2)
    prompts = [
        {"id": f"r{i}", "prompt": list(range(5 + i, 12 + 2 * i)), "max_tokens": 2 + i} for i in range(5)
    ]
    (job_dir / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    output = tmp_path / "results.jsonl"  # absolute: the job runs in a copy of job_dir
    # A short temp dir: Ray's unix sockets live under it and their paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="mlapipe-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_DEDUP_LOGS"] = "0"
    # A loopback-only head for this test: no token auth (Ray turns it on when ~/.ray/auth_token exists,
    # and the job CLI would then need that token).
    env["RAY_AUTH_MODE"] = "disabled"
    head, dashboard_port = start_head(temp_dir, env)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_server(address, head)
        entrypoint = (
            f"mlapipe batch --input prompts.jsonl --output {output} -m tiny.gguf --pipeline 2 --no-progress"
        )
        status, logs = wait_for_job(address, submit_job(address, job_dir, entrypoint, env))
        assert status == "SUCCEEDED", logs[-3000:]
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(results) == [p["id"] for p in prompts]
    for p in prompts:
        result = results[p["id"]]
        assert result["prompt_tokens"] == len(p["prompt"])
        assert len(result["token_ids"]) == result["completion_tokens"]
        assert result["finish_reason"] == "length" or result["finish_reason"] == "stop"
        if result["finish_reason"] == "length":
            assert result["completion_tokens"] == p["max_tokens"]
    assert not processes_naming(temp_dir), "processes of the test's Ray head outlived it"
