"""Engine: the public API. Tokenize, schedule, run micro-batches, collect tokens, finish requests.

    with Engine("model.gguf") as engine:
        results = engine.generate(["text", [1, 2, 3]], SamplingParams(max_tokens=32))
        engine.score([1, 2, 3, 4])  # log p(t_i | t_<i) for i >= 1

A prompt given as token ids is used exactly as given; text follows the file's add_bos.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

from mlapipe.runtime.block_manager import BlockManager
from mlapipe.runtime.detokenizer import IncrementalDetokenizer
from mlapipe.runtime.engine_args import DEFAULT_UBATCH, check_engine_args, default_device, tls_files
from mlapipe.runtime.errors import StageFailed
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.loading_bar import loading_bar, stage_progress
from mlapipe.runtime.metrics import EngineMetrics
from mlapipe.runtime.planner import (
    DEFAULT_KV_MEMORY_FRACTION,
    check_fits,
    has_quantized_experts,
    layer_weight_bytes,
    plan_for_model,
    plan_kv_from_memory,
)
from mlapipe.runtime.sampling_params import SamplingParams
from mlapipe.runtime.scheduler import Request, Scheduler
from mlapipe.runtime.shapes import RandomModel, is_random_spec
from mlapipe.runtime.threads import cpu_threads as default_cpu_threads
from mlapipe.runtime.tokenizer import GGUFTokenizer

DEFAULT_N_CTX = 4096  # capped by the model's context_length

Prompt = str | Sequence[int]

log = logging.getLogger("mlapipe.engine")


class PromptError(ValueError):
    """A prompt the engine cannot run (too long for the context, empty, token ids outside the vocab)."""


class RequestFailed(RuntimeError):
    """A request ended with an error (a pipeline stage failed); the message names the cause."""


class EngineClosed(RuntimeError):
    """A method of an engine that close() (or leaving its with block) has already shut down."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class StreamEvent:
    token_id: int
    text: str  # the text this token adds
    finish_reason: str | None = None  # set on the request's last token: "stop" | "length"


class Engine:
    def __init__(
        self,
        model: str | os.PathLike,
        *,
        pipeline: int = 1,
        devices: str | None = None,  # "cuda" or "cpu"; default: cuda when available
        amb: float | Sequence[float] = 0.0,  # MiB; one value for all stages or one per stage
        ubatch: int | None = None,  # tokens per micro-batch; default DEFAULT_UBATCH of the device
        n_ctx: int | None = None,
        transport: str | None = None,  # "nccl" | "gloo" | "grpc"; default: the fastest available
        address: str | None = None,  # join this Ray cluster (else RAY_ADDRESS, else start a local one)
        split: Sequence[float] | None = None,  # layers per stage in proportion, like llama.cpp's -ts
        use_ray: bool | None = None,  # default: only when pipeline > 1 or an address is given
        block_size: int = 64,
        kv_blocks: int | None = None,
        max_seqs_per_batch: int = 256,
        decode_steps: int = 16,  # decode tokens per driver round trip (1: the driver sees every step)
        attention: str = "auto",
        deadline_s: float = 120.0,
        placement: str = "PACK",  # Ray placement strategy of the stages
        metrics_port: int | None = None,  # serve Prometheus metrics on this port (0: any free one)
        metrics_host: str = "127.0.0.1",  # the metrics server's address ("0.0.0.0": every interface)
        transport_tls: str | None = None,  # "CERT,KEY,CA[,SERVER_NAME]": mutual TLS on gRPC links
        progress: bool | None = None,  # model-loading bar on stderr; default: only when it is a terminal
        cpu_threads: int | None = None,  # torch threads per CPU stage; default: runtime/threads.py
        kv_memory_fraction: float | None = None,  # size the KV cache from memory (default 0.9 on GPUs)
        dequantize_weights: bool = False,  # decode every weight at load instead of keeping GGUF blocks
        device_memory: int | None = None,  # plan as if each device were an empty one of this many bytes
    ):
        self._closed = False
        model = os.fspath(model)  # a path object works as well as a string
        check_engine_args(
            pipeline=pipeline,
            amb=amb,
            ubatch=ubatch,
            n_ctx=n_ctx,
            block_size=block_size,
            kv_blocks=kv_blocks,
            max_seqs_per_batch=max_seqs_per_batch,
            decode_steps=decode_steps,
            deadline_s=deadline_s,
            metrics_port=metrics_port,
            transport=transport,
            devices=devices,
        )
        tls = tls_files(transport_tls, transport)
        if address:  # a cluster that does not answer fails now, not after the model is read
            from mlapipe.runtime.ray_local import check_reachable

            check_reachable(address)
        random_weights = is_random_spec(model)
        self.model = RandomModel(model) if random_weights else GGUFModel(model)
        self.config = self.model.config
        self.tokenizer = None if random_weights else open_tokenizer(self.model)
        if n_ctx is not None and n_ctx > self.config.context_length:
            raise ValueError(
                f"n_ctx={n_ctx} is above the model's maximum context of {self.config.context_length} tokens "
                f"({self.model.path}: context_length)"
            )
        self.n_ctx = n_ctx or min(DEFAULT_N_CTX, self.config.context_length)
        blocks_per_seq = -(-self.n_ctx // block_size)
        if kv_blocks is not None and kv_blocks < blocks_per_seq:
            raise ValueError(f"kv_blocks={kv_blocks} cannot hold one sequence of n_ctx={self.n_ctx} tokens")
        device = devices or default_device()
        ubatch = ubatch or DEFAULT_UBATCH[device]
        self.ubatch = ubatch
        self.cpu_threads = cpu_threads or default_cpu_threads()
        # The cache: a given number of blocks, else sized from memory (GPUs, or when a fraction is given),
        # else (CPU: the test and oracle path) 4 sequences of n_ctx.
        if kv_memory_fraction is None and kv_blocks is None and device == "cuda":
            kv_memory_fraction = DEFAULT_KV_MEMORY_FRACTION
        sized_from_memory = kv_memory_fraction is not None and kv_blocks is None
        fixed_blocks = kv_blocks or 4 * blocks_per_seq
        runner_options = {"attention": attention, "dequantize": dequantize_weights}
        self.plan = None
        use_pipeline = use_ray or (use_ray is None and (pipeline > 1 or address))
        num_stages = pipeline if use_pipeline else 1
        element_size = 2 if device == "cuda" else 4
        self._plan_options = dict(split=split, amb_mib=amb, ubatch=ubatch, n_ctx=self.n_ctx)
        self._plan_options |= dict(element_size=element_size, kv_element_size=element_size)
        self._plan_options["dequantize"] = dequantize_weights

        def check_plan(device_infos: list[dict]) -> int:
            """Plans the stages on the devices found (before any weight is read); returns KV blocks.
            Weights that do not fit are refused with what would (plan_kv_from_memory's message), whether
            the cache is sized from memory or given."""
            options = dict(self._plan_options)
            if device_memory is not None:
                device_infos = [
                    d | {"total_bytes": device_memory, "free_bytes": device_memory} for d in device_infos
                ]
            names = [d["device"] for d in device_infos]
            dequantize, element_size = options.pop("dequantize"), options.pop("element_size")
            layers, embed, head = layer_weight_bytes(self.model, element_size, dequantize)
            options["quantized_experts"] = has_quantized_experts(self.model, dequantize)
            memory_plan = plan_kv_from_memory(
                self.config,
                layers,
                embed,
                head,
                num_stages,
                total_bytes=[d["total_bytes"] for d in device_infos],
                free_bytes=[d["free_bytes"] for d in device_infos],
                device_names=names,
                kv_memory_fraction=kv_memory_fraction if sized_from_memory else 1.0,
                block_size=block_size,
                element_size=element_size,
                **options,
            )
            if sized_from_memory:
                self.plan = memory_plan
                return memory_plan.num_kv_tokens // block_size
            options.pop("quantized_experts")
            self.plan = plan_for_model(
                self.model,
                num_stages,
                num_kv_tokens=fixed_blocks * block_size,
                dequantize=dequantize,
                element_size=element_size,
                **options,
            )
            check_fits(self.plan, [d["free_bytes"] for d in device_infos], names)
            return fixed_blocks

        loading = loading_bar(self.model, progress)
        if use_pipeline:
            self.executor = self._start_pipeline(
                pipeline,
                device,
                ubatch,
                transport,
                address,
                deadline_s,
                placement,
                runner_options,
                check_plan,
                fixed_blocks,
                block_size,
                tls,
                stage_progress(loading, self.config.num_layers, pipeline),
            )
        else:
            from mlapipe.workers.local_executor import LocalExecutor  # the driver imports GPU code only here

            amb_mib = amb if isinstance(amb, (int, float)) else amb[0]
            self.executor = LocalExecutor(
                self.model,
                fixed_blocks,
                block_size,
                self.n_ctx,
                device=device,
                amb_mib=amb_mib,
                cpu_threads=self.cpu_threads,
                check_plan=check_plan,
                **runner_options,
            )
        self.blocks = BlockManager(self.executor.num_kv_blocks, block_size)
        loading.close()
        self.scheduler = Scheduler(
            self.blocks,
            ubatch,
            self.n_ctx,
            self.executor.num_groups,
            max_seqs_per_batch,
            self.tokenizer.eos_token_id if self.tokenizer else None,
            decode_steps,
            getattr(self.executor, "decode_groups", None),
        )
        self._ids = itertools.count()
        self._failure: str | None = None
        self._in_process = not hasattr(self.executor, "actors")  # LocalExecutor: stage errors raise here
        self.metrics = EngineMetrics(self.scheduler, self.blocks, self.executor)
        if metrics_port is not None:
            try:
                self.metrics.serve(metrics_port, metrics_host)
            except ValueError:
                self.executor.shutdown()
                raise

    def _start_pipeline(
        self,
        num_stages,
        device,
        ubatch,
        transport,
        address,
        deadline_s,
        placement,
        options,
        check_plan,
        num_kv_blocks,
        block_size,
        tls,
        on_stage_loaded,
    ):
        from mlapipe.runtime.pipeline import RayPipeline, StageSpec

        transport = transport or ("nccl" if device == "cuda" else "gloo")
        if transport == "nccl" and device != "cuda":
            raise ValueError("transport nccl needs CUDA GPUs; on CPU use gloo or grpc")
        # the layer split and amb per stage do not depend on the devices' memory: plan them now, and
        # again with the devices' numbers once the stages report them (check_plan)
        split_plan = plan_for_model(
            self.model, num_stages, num_kv_tokens=num_kv_blocks * block_size, **self._plan_options
        )
        stages = [StageSpec(s.first_layer, s.end_layer, s.amb_mib) for s in split_plan.stages]
        return RayPipeline(
            self.model.path,
            stages,
            use_gpu=device == "cuda",
            transport=transport,
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            max_seq_len=self.n_ctx,
            deadline_s=deadline_s,
            address=address,
            check_plan=check_plan,
            placement=placement,
            runner_options=options,
            transport_tls=tls,
            cpu_threads=self.cpu_threads,
            on_stage_loaded=on_stage_loaded,
        )

    # requests -----------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, score_only: bool = False
    ) -> str:
        self._check_open()
        if self._failure:
            raise RequestFailed(
                f"the engine cannot run requests after a failure ({self._failure}); rebuild it"
            )
        token_ids = self._prompt_ids(prompt, score_only)
        request = Request(f"req-{next(self._ids)}", token_ids, params or SamplingParams(), score_only)
        self.scheduler.add(request)
        self.metrics.on_request_added(request)
        log.info("request %s added: %d prompt tokens", request.request_id, len(token_ids))
        return request.request_id

    def step(self) -> tuple[list[Request], list[Request]]:
        """Runs what can run now; returns (requests that got tokens, requests that finished)."""
        self._check_open()
        batches = self.scheduler.schedule_all()
        advanced, finished = [], []
        try:
            if batches:
                self.executor.submit(batches)
            outputs = self.executor.collect()
        except StageFailed as failure:  # the pipeline is gone: nothing queued can run any more
            self._failure = str(failure)
            outputs, finished = [], self.scheduler.abort_all(self._failure)
        except Exception as error:
            if not self._in_process:
                raise
            # What the stage's own guard lets through (workers/stage.py: a sticky device error) raised
            # here, in process: these micro-batches' requests fail, their KV blocks are freed.
            reason = f"{type(error).__name__}: {error}"
            log.warning("micro-batches %s failed: %s", [b.batch_id for b in batches], reason)
            outputs = []
            for batch in batches:
                finished += self.scheduler.fail_batch(batch.batch_id, reason)
        except BaseException:  # Ctrl-C inside an in-process step: the batch never finishes; forget it
            if self._in_process:
                for batch in batches:
                    self.scheduler.fail_batch(batch.batch_id, "interrupted")
            raise
        for output in outputs:
            if output.error is not None:  # it raised on a stage: retried request by request (scheduler)
                log.warning("micro-batch %d failed: %s", output.batch_id, output.error)
                finished += self.scheduler.retry_or_fail_batch(output.batch_id, output.error)
                continue
            got, done = self.scheduler.update(output)
            advanced += got
            finished += done
        self.metrics.on_step(advanced, finished, len(batches))
        for request in finished:
            log.info(
                "request %s finished: %s, %d tokens",
                request.request_id,
                request.finish_reason,
                len(request.output_token_ids),
            )
        return advanced, finished

    def abort(self, request_id: str, finish_reason: str = "abort") -> None:
        """Ends an unfinished request and frees its KV blocks: now, or when the micro-batch it is in
        comes back (the stages are still writing its blocks). Unknown or finished ids are ignored.
        finish_reason: "abort" (its client went away) or "stop" (the caller found a stop string)."""
        request = self.scheduler.abort(request_id, finish_reason)
        if request is not None:  # ended now: step() will not report it
            self.metrics.on_step([], [request], 0)
            log.info("request %s aborted", request_id)

    @property
    def failure(self) -> str | None:
        """Why the engine cannot run requests any more (a pipeline stage failed), or None."""
        return self._failure

    # conveniences -------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.add_request(p, params) for p in prompts]
        done: dict[str, Request] = {}
        while len(done) < len(ids):
            for request in self.step()[1]:
                done[request.request_id] = request
            if len(done) < len(ids) and not self.scheduler.has_unfinished and not self.scheduler.in_flight:
                raise RuntimeError("the scheduler lost requests it was given")  # never spin
        return [self._output(done[i]) for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        request_id = self.add_request(prompt, params)
        request, emitted = None, 0
        text = IncrementalDetokenizer(self.tokenizer)
        while request is None or not request.finished:
            advanced, finished = self.step()
            for r in advanced + finished:
                if r.request_id == request_id:
                    request = r
            if request is None:
                continue
            _raise_if_failed(request)
            tokens = request.output_token_ids
            for token in tokens[emitted:]:
                emitted += 1
                last = request.finished and emitted == len(tokens)
                yield StreamEvent(token, text.add(token, final=last), request.finish_reason if last else None)

    def score(self, token_ids: Sequence[int]) -> list[float]:
        """log p(t_i | t_<i) for i = 1..n-1 (perplexity is exp(-mean))."""
        request_id = self.add_request(list(token_ids), score_only=True)
        while True:
            for request in self.step()[1]:
                if request.request_id == request_id:
                    _raise_if_failed(request)
                    return request.scores

    # lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Gives back everything the engine took, now: the metrics server, the model's device memory
        (in-process: weights, latent cache, CUDA graphs and their pools, cached blocks), and for a Ray
        pipeline its actors and placement group. Later calls raise EngineClosed; closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self.scheduler.abort_all("engine closed")
        self.metrics.close()
        executor, self.executor = self.executor, None
        executor.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(
                f"the engine for {self.model.path} is closed: build a new Engine to run requests"
            )

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # helpers ------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt, score_only: bool = False) -> list[int]:
        if isinstance(prompt, str) and self.tokenizer is None:
            raise PromptError(f"{self.model.path} has no tokenizer: give prompts as token ids")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif all(type(t) is int for t in prompt):  # the common case, checked in one pass (bool is not int)
            token_ids = list(prompt)
        else:
            # Token ids are used as given: 2.5 (or True) is refused, never truncated to 2 (or 1).
            bad_type = [t for t in prompt if isinstance(t, bool) or not isinstance(t, Integral)]
            if bad_type:
                raise PromptError(f"token ids must be integers, got {bad_type[0]!r}")
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise PromptError("empty prompt")
        vocab = self.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            bad = [t for t in token_ids if not 0 <= t < vocab]
            raise PromptError(f"token ids {bad[:5]} outside the vocabulary (0..{vocab - 1})")
        if len(token_ids) > self.n_ctx - (0 if score_only else 1):  # generating needs room for a token
            raise PromptError(
                f"prompt is {len(token_ids)} tokens, longer than the context allows: n_ctx={self.n_ctx} "
                f"(the model supports up to {self.config.context_length}; raise n_ctx or shorten the prompt)"
            )
        return token_ids

    def _output(self, request: Request) -> RequestOutput:
        _raise_if_failed(request)
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            list(request.output_token_ids),
            self.tokenizer.decode(request.output_token_ids) if self.tokenizer else "",
            request.finish_reason,
        )


def open_tokenizer(model: GGUFModel) -> GGUFTokenizer:
    """The file's tokenizer; anything wrong with its tokenizer.* metadata is the file's error."""
    from mlapipe.runtime.gguf_model import ModelFileError
    from mlapipe.runtime.tokenizer import TokenizerError

    try:
        tokenizer = GGUFTokenizer(model.metadata)
    except TokenizerError as e:
        raise ModelFileError(f"{model.path}: {e}") from None
    except Exception as e:  # a key missing or of the wrong type: the tokenizer reads only the file
        raise ModelFileError(f"{model.path}: cannot build its tokenizer ({type(e).__name__}: {e})") from None
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name)
        if token is not None and not 0 <= token < tokenizer.vocab_size:
            raise ModelFileError(
                f"{model.path}: tokenizer.ggml.{name} = {token} is outside the vocabulary (0..{tokenizer.vocab_size - 1})"
            )
    return tokenizer


def _raise_if_failed(request: Request) -> None:
    if request.finish_reason and request.finish_reason.startswith("error"):
        raise RequestFailed(f"request {request.request_id} failed: {request.finish_reason[7:]}")
