"""Transport and listener security on CPU, loopback, two stages: another process on the machine cannot
inject activations, pin a stage's memory, stall it or kill it, and nothing of ours listens on a
wildcard address.

The attacker is this test process speaking the stages' own protocol with a real gRPC client, with and
without the engine's link secret (with it, it stands for a buggy or hostile peer inside the engine).
"""

import datetime
import ipaddress
import socket
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import ray

from mlapipe.runtime import Engine, SamplingParams
from mlapipe.runtime.tiny_models import write_tiny_model
from mlapipe.workers.transport import grpc_stream
from mlapipe.workers.transport.auth import LinkSecret

PROMPTS = [list(range(5, 12)), [40, 41, 42], list(range(60, 80))]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
WILDCARDS = {"0.0.0.0", "::"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sec") / "v3.gguf", "v3", seed=3)


@pytest.fixture(scope="module")
def expected(model_path):
    with Engine(model_path, block_size=16, decode_steps=1) as engine:
        return [r.token_ids for r in engine.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def grpc_engine(ray_local, model_path):
    with Engine(
        model_path, pipeline=2, transport="grpc", use_ray=True, block_size=16, deadline_s=30, metrics_port=0
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def gloo_engine(ray_local, model_path):
    with Engine(model_path, pipeline=2, transport="gloo", use_ray=True, block_size=16, deadline_s=30) as engine:
        yield engine


def tokens(engine, prompts=PROMPTS):
    return [r.token_ids for r in engine.generate(prompts, PARAMS)]


def send(target, key, header, payload_chunks, secret=None, tag=None, timeout=10.0, credentials=None):
    """One activation stream as a stage would send it, to an address or over an open channel; returns
    the status code it ended with."""
    if isinstance(target, grpc.Channel):
        channel = target
    else:
        channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    try:
        metadata = [(grpc_stream.KEY_HEADER, key), (grpc_stream.TENSOR_HEADER, header)]
        if secret is not None or tag is not None:
            metadata.append((grpc_stream.TAG_HEADER, tag or secret.tag(key, header)))
        channel.stream_unary(grpc_stream.METHOD)(iter(payload_chunks), timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        if channel is not target:
            channel.close()


def stage_stats(engine):
    return engine.executor.stats()


def rejected(engine, stage, reason):
    return stage_stats(engine)[stage]["transport_rejected"].get(reason, 0)


# authentication -------------------------------------------------------------------------------------
def test_streams_without_the_secret_are_refused_and_change_nothing(grpc_engine, expected):
    engine = grpc_engine
    hidden = engine.config.hidden_size
    addresses = engine.executor.link_addresses
    before = rejected(engine, 1, "unauthenticated")
    stop = threading.Event()
    codes = []

    def attack():  # pre-send activations and tokens for the batch ids the engine is about to use
        first, last = (grpc.insecure_channel(a) for a in addresses)
        i = 0
        while not stop.is_set() and i < 400:
            key = f"{i % 200}.{i // 200}"
            codes.append(send(last, key, f"torch.float32:7,{hidden}", [b"\0" * 7 * hidden * 4]))
            codes.append(send(first, f"back:{key}", "torch.int64:3", [b"\1" * 24], tag="0" * 64))
            i += 1
        first.close()
        last.close()

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        assert tokens(engine) == expected
    finally:
        stop.set()
        attacker.join()
    assert codes and set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert rejected(engine, 1, "unauthenticated") >= before + len(codes) // 2
    assert tokens(engine) == expected


def test_a_wrong_secret_is_refused(grpc_engine):
    address = grpc_engine.executor.link_addresses[1]
    header = f"torch.float32:1,{grpc_engine.config.hidden_size}"
    assert send(address, "0.0", header, [b""], secret=LinkSecret()) == grpc.StatusCode.UNAUTHENTICATED


# bounded, validated receive ---------------------------------------------------------------------------
def test_bad_messages_for_a_live_key_fail_nothing(grpc_engine, expected):
    """Stage 0 is held back (a sleep queued before the micro-batch) so that stage 1 expects the key and
    nothing has arrived for it yet; wrong-shape, huge-header and oversize streams for that key are
    dropped, and the real activations that follow give the right tokens."""
    engine = grpc_engine
    secret, hidden = engine.executor._secret, engine.config.hidden_size
    address = engine.executor.link_addresses[1]
    stage0 = engine.executor.actors[0]
    before = {r: rejected(engine, 1, r) for r in ("bad_header", "oversize")}
    prompt = PROMPTS[2]
    engine.add_request(prompt, PARAMS)
    results = {}
    stage0.__ray_call__.remote(lambda self: time.sleep(3))  # runs before the batch on stage 0
    stepping = threading.Thread(target=lambda: results.update(done=_run_to_end(engine)))
    stepping.start()
    while not engine.scheduler.in_flight:
        time.sleep(0.01)
    key = f"{min(engine.scheduler.in_flight)}.0"
    rows = len(prompt)
    attempts = {
        "wrong shape": (f"torch.float32:{rows + 1},{hidden}", [b"\0" * (rows + 1) * hidden * 4]),
        "huge shape": (f"torch.float32:{1 << 40},{hidden}", [b"\0" * 1024]),
        "wrong dtype": (f"torch.float64:{rows},{hidden}", [b"\0" * rows * hidden * 8]),
        "oversize": (f"torch.float32:{rows},{hidden}", [b"\0" * rows * hidden * 4, b"\0" * 4096]),
    }
    codes = {}
    for name, (header, chunks) in attempts.items():
        deadline = time.monotonic() + 5
        while True:  # the driver's expect() reaches stage 1 a moment after the submit
            codes[name] = send(address, key, header, chunks, secret=secret)
            if codes[name] != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    stepping.join(timeout=60)
    assert codes == {
        "wrong shape": grpc.StatusCode.INVALID_ARGUMENT,
        "huge shape": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong dtype": grpc.StatusCode.INVALID_ARGUMENT,
        "oversize": grpc.StatusCode.OUT_OF_RANGE,
    }
    (output,) = results["done"]
    assert output.token_ids == expected[2]
    assert rejected(engine, 1, "bad_header") == before["bad_header"] + 3
    assert rejected(engine, 1, "oversize") == before["oversize"] + 1
    assert tokens(engine) == expected  # still serving


def test_abandoned_buffers_are_freed_after_the_deadline():
    """A step whose micro-batch was abandoned (its bytes came, nobody took them) is freed by the sweep
    once its deadline passes; an expected key nobody sent is forgotten the same way."""
    import torch

    from mlapipe.workers.transport.inbox import Inbox

    inbox = Inbox(timeout_s=0.2)
    inbox.expect("7.0", (4, 8), torch.float32)
    inbox.expect("8.0", (4, 8), torch.float32)
    assert inbox.admit("7.0", "torch.float32", (4, 8)) == (None, 128)
    inbox.deliver("7.0", torch.zeros(128, dtype=torch.uint8))
    assert inbox.buffered_bytes == 128
    time.sleep(0.3)
    inbox.sweep()
    assert inbox.buffered_bytes == 0 and inbox.rejected["expired"] == 1
    assert inbox.admit("8.0", "torch.float32", (4, 8))[0] == "unknown_key"  # forgotten too


def _run_to_end(engine):
    finished = []
    while not finished:
        finished = engine.step()[1]
    return [engine._output(r) for r in finished]


def test_unknown_keys_leave_no_memory_behind(grpc_engine, expected):
    engine = grpc_engine
    secret, hidden = engine.executor._secret, engine.config.hidden_size
    address = engine.executor.link_addresses[1]
    stage1 = psutil.Process(engine.executor.devices[1]["pid"])
    chunk = b"\7" * (1 << 20)
    rows = 4 * (1 << 20) // (hidden * 4)
    channel = grpc.insecure_channel(address)

    def unknown_keys(count: int, first: int) -> set:
        return {
            send(channel, f"{first + i}.0", f"torch.float32:{rows},{hidden}", [chunk] * 4, secret=secret)
            for i in range(count)
        }

    tokens(engine)  # the stage at its working size
    unknown_keys(5, 10**6)  # gRPC's own first-use allocations
    before_rss = stage1.memory_info().rss
    before = rejected(engine, 1, "unknown_key")
    codes = unknown_keys(100, 2 * 10**6)  # 400 MiB offered in all
    grown = (stage1.memory_info().rss - before_rss) / 2**20
    channel.close()
    print(f"stage 1 RSS change after 100 unknown-key streams of 4 MiB: {grown:+.1f} MiB")
    assert codes == {grpc.StatusCode.FAILED_PRECONDITION}
    assert rejected(engine, 1, "unknown_key") == before + 100
    assert grown < 32
    assert tokens(engine) == expected


def test_idle_connections_do_not_stall_a_generation(grpc_engine, expected):
    engine = grpc_engine
    secret, hidden = engine.executor._secret, engine.config.hidden_size
    usual = min(_timed(engine) for _ in range(2))
    idle_sockets, idle_calls, channels = [], [], []
    blocked = threading.Event()

    def never_sends():
        blocked.wait()
        yield b""

    for address in engine.executor.link_addresses:
        host, port = address.rsplit(":", 1)
        for i in range(10):
            idle_sockets.append(socket.create_connection((host, int(port))))  # TCP only, no HTTP/2
            channel = grpc.insecure_channel(address)
            channels.append(channel)
            key, header = f"{10**6 + i}.0", f"torch.float32:1,{hidden}"
            metadata = [(grpc_stream.KEY_HEADER, key), (grpc_stream.TENSOR_HEADER, header)]
            if i % 2:  # half with the secret, for keys nobody expects
                metadata.append((grpc_stream.TAG_HEADER, secret.tag(key, header)))
            call = channel.stream_unary(grpc_stream.METHOD).future(never_sends(), timeout=60, metadata=metadata)
            idle_calls.append(call)
    try:
        with_idle = min(_timed(engine) for _ in range(2))
        print(f"generation: {usual:.2f} s usually, {with_idle:.2f} s beside 20 idle connections per stage")
        assert with_idle < usual + 1.0
        assert all(c.done() and c.exception() is not None for c in idle_calls)  # refused at once
    finally:
        blocked.set()
        for s in idle_sockets:
            s.close()
        for c in channels:
            c.close()


def _timed(engine) -> float:
    started = time.perf_counter()
    tokens(engine)
    return time.perf_counter() - started


# listeners ---------------------------------------------------------------------------------------
def listeners(pid: int) -> list[tuple[str, int]]:
    return [
        (_unmapped(c.laddr.ip), c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


def _unmapped(ip: str) -> str:
    """::ffff:127.0.0.1 (an IPv6 socket bound to an IPv4 address) as 127.0.0.1."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped else ip


@ray.remote(num_cpus=0)
class _PlainActor:
    def pid(self):
        import os

        return os.getpid()


def test_no_listener_of_ours_on_a_wildcard_address(ray_local, grpc_engine, gloo_engine):
    """Ray's own worker sockets are what a plain actor process has; a stage may have those and nothing
    else on a wildcard address. Our gRPC servers, gloo's pair sockets and the metrics server are on
    loopback (one node), and there is no rendezvous port at all."""
    plain = _PlainActor.remote()
    ray_wildcards = sum(ip in WILDCARDS for ip, _ in listeners(ray.get(plain.pid.remote())))
    ray.kill(plain)
    tokens(gloo_engine, PROMPTS[:1])
    for engine in (grpc_engine, gloo_engine):
        for device in engine.executor.devices:
            found = listeners(device["pid"])
            assert sum(ip in WILDCARDS for ip, _ in found) <= ray_wildcards, found
            ours = [(ip, port) for ip, port in found if ip not in WILDCARDS]
            assert ours and all(ipaddress.ip_address(ip).is_loopback for ip, _ in ours), found
    for address in grpc_engine.executor.link_addresses:
        assert address.startswith("127.0.0.1:")
    metrics = [ip for ip, port in listeners(psutil.Process().pid) if port == grpc_engine.metrics.port]
    assert metrics == ["127.0.0.1"]


def test_gloo_links_refuse_strangers(gloo_engine, expected):
    """The rendezvous store answers no call without the secret's tag; garbage sent to gloo's own pair
    sockets (connected at start-up, through that store) changes nothing."""
    engine = gloo_engine
    store = engine.executor._store_actor
    with pytest.raises(ray.exceptions.RayTaskError, match="PermissionError"):
        ray.get(store.num_keys.remote(LinkSecret().tag("rendezvous-store")))
    with pytest.raises(ray.exceptions.RayTaskError, match="PermissionError"):
        ray.get(store.set.remote("", "default_pg/0//cpu//0", b"10.0.0.1:1"))
    strangers = []
    for device in engine.executor.devices:
        for ip, port in listeners(device["pid"]):
            if ip not in WILDCARDS:
                for garbage in (b"", b"\0" * 8, b"\1" + b"\0" * 7 + b"A" * 100):
                    strangers.append(socket.create_connection((ip, port)))
                    strangers[-1].sendall(garbage)
    assert strangers
    try:
        assert tokens(engine) == expected
    finally:
        for s in strangers:
            s.close()
    assert tokens(engine) == expected


# mutual TLS ----------------------------------------------------------------------------------------
def _certificates(directory, name: str, ca=None, dns_name=None):
    """A key and a certificate for 127.0.0.1 (or only for `dns_name`) signed by `ca` (key, cert), or a
    self-signed CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[1].subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        names = [x509.DNSName(dns_name)] if dns_name else [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        san = x509.SubjectAlternativeName(names)
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca[0] if ca else key, hashes.SHA256())
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return (key, cert), str(key_path), str(cert_path)


def test_mutual_tls_refuses_a_client_of_another_ca(ray_local, model_path, expected, tmp_path):
    ca, _, ca_path = _certificates(tmp_path, "ca")
    _, key_path, cert_path = _certificates(tmp_path, "stage", ca)
    other_ca, _, other_ca_path = _certificates(tmp_path, "other-ca")
    _, other_key, other_cert = _certificates(tmp_path, "intruder", other_ca)
    tls = f"{cert_path},{key_path},{ca_path}"
    with Engine(
        model_path, pipeline=2, transport="grpc", transport_tls=tls, use_ray=True, block_size=16
    ) as engine:
        assert tokens(engine) == expected
        secret, hidden = engine.executor._secret, engine.config.hidden_size
        address = engine.executor.link_addresses[1]
        header = f"torch.float32:1,{hidden}"
        read = lambda p: Path(p).read_bytes()
        intruder = grpc.ssl_channel_credentials(read(ca_path), read(other_key), read(other_cert))
        distrusting = grpc.ssl_channel_credentials(read(other_ca_path), read(key_path), read(cert_path))
        for credentials in (intruder, distrusting):  # even with the link secret
            code = send(address, "0.0", header, [b""], secret=secret, timeout=5, credentials=credentials)
            assert code == grpc.StatusCode.UNAVAILABLE
        assert send(address, "0.0", header, [b""], secret=secret, timeout=5) == grpc.StatusCode.UNAVAILABLE
        assert rejected(engine, 1, "unknown_key") == 0  # none of them got as far as the gate
        assert tokens(engine) == expected


def test_one_certificate_for_every_node_through_a_server_name(tmp_path):
    """CERT,KEY,CA,SERVER_NAME: a certificate issued for a name, not an address, serves a stage that is
    dialled by address (two transports in this process, no Ray)."""
    import torch

    from mlapipe.workers.transport.grpc_stream import GrpcTransport
    from mlapipe.workers.transport.tls import TlsFiles

    ca, _, ca_path = _certificates(tmp_path, "ca")
    _, key_path, cert_path = _certificates(tmp_path, "cluster", ca, dns_name="mlapipe-stage")
    secret = LinkSecret()
    tensors = [torch.randn(5, 8), torch.arange(3)]
    for server_name, works in (("mlapipe-stage", True), (None, False)):
        tls = TlsFiles(cert_path, key_path, ca_path, server_name)
        timeout = 5.0 if works else 1.0
        receiver, sender = (GrpcTransport("cpu", timeout, secret, tls) for _ in range(2))
        try:
            address = receiver.serve("127.0.0.1")
            if not works:  # the certificate does not name 127.0.0.1: no channel comes up
                with pytest.raises(grpc.FutureTimeoutError):
                    sender.connect(address)
                continue
            sender.connect(address)
            for i, tensor in enumerate(tensors):
                receiver.expect(f"{i}.0", tuple(tensor.shape), tensor.dtype)
                sender.send(f"{i}.0", tensor)
                assert torch.equal(receiver.recv(f"{i}.0", tuple(tensor.shape), tensor.dtype), tensor)
            assert receiver.inbox.buffered_bytes == 0
        finally:
            sender.close()
            receiver.close()


def test_transport_tls_is_checked_before_anything_starts(model_path):
    with pytest.raises(ValueError, match="CERT,KEY,CA"):
        Engine(model_path, pipeline=2, transport="grpc", transport_tls="only-a-cert.pem")
    with pytest.raises(ValueError, match="grpc transport"):
        Engine(model_path, pipeline=2, transport="gloo", transport_tls="a,b,c")
