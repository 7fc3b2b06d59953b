"""Offline batch generation: prompts from a JSONL file, one result line per request as it finishes.

Input line:  {"id": "a", "prompt": "text" | [token ids], optional "max_tokens", "temperature",
              "top_k", "top_p", "seed"}            (id defaults to the line number)
Output line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}, or for
             a request that can never run: {"id", "error", "finish_reason": "error"}

The output file is the only record of progress: each result is appended, flushed and fsynced the moment
its request finishes, so a crash or Ctrl-C loses only requests still running, and a re-run skips every
id already in the file. Failures come in two kinds:
- permanent: the line itself is wrong (a field of the wrong type or out of range, an unknown field, a
  prompt the engine refuses: too long for n_ctx, token ids outside the vocabulary). Running it again
  would fail again, so an error line is written and a re-run skips it;
- transient: the engine failed while the request ran (a stage died). Nothing is written, so the next
  run retries it.
A line without a usable id (not JSON, not an object, a bad or repeated id) refuses the whole file before
the model loads: without an id, its result could not be found again on resume.
Results appear in completion order.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mlapipe.runtime.sampling_params import SamplingParams

SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed")
# How many requests the engine holds at once: enough to fill every micro-batch, few enough that the
# first results appear soon and a huge input is not tokenized up front.
DEFAULT_WINDOW = 256


class BatchInputError(ValueError):
    """A line of the input file that cannot become a request; the message names the file and line."""


@dataclass
class BatchItem:
    request_id: str | int
    prompt: str | list[int]
    params: SamplingParams
    error: str | None = None  # the line cannot become a request: a permanent failure, written as such


@dataclass
class BatchSummary:
    total: int
    skipped: int = 0  # already in the output file from an earlier run (results and error lines)
    written: int = 0
    failed: dict[str | int, str] = field(default_factory=dict)  # id -> why; retried by a re-run
    refused: dict[str | int, str] = field(default_factory=dict)  # id -> why; error line written


def read_requests(path: str, defaults: SamplingParams) -> list[BatchItem]:
    items: list[BatchItem] = []
    seen: dict[str | int, int] = {}
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise BatchInputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = _parse_line(line, number, defaults, f"{path}:{number}")
        if item.request_id in seen:
            raise BatchInputError(
                f"{path}:{number}: id {item.request_id!r} already used on line {seen[item.request_id]} "
                "(ids must be unique: resuming skips ids already done)"
            )
        seen[item.request_id] = number
        items.append(item)
    return items


def _parse_line(line: str, number: int, defaults: SamplingParams, where: str) -> BatchItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BatchInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BatchInputError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise BatchInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    request_id = record.get("id", number)
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or not _utf8(request_id):
        raise BatchInputError(f"{where}: id must be a string or an integer, got {request_id!r}")
    try:
        prompt, params = _request_fields(record, defaults)
    except BatchInputError as e:
        return BatchItem(request_id, "", defaults, error=f"{where}: {e}")
    return BatchItem(request_id, prompt, params)


def _request_fields(record: dict, defaults: SamplingParams) -> tuple[str | list[int], SamplingParams]:
    """The prompt and sampling parameters of a line, every field checked; BatchInputError says which."""
    unknown = sorted(set(record) - {"id", "prompt", *SAMPLING_KEYS})
    if unknown:
        raise BatchInputError(
            f"unknown field {unknown[0]!r} (a line has id, prompt, {', '.join(SAMPLING_KEYS)})"
        )
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt:
        if not _utf8(prompt):
            raise BatchInputError('"prompt" holds an unpaired surrogate (\\ud800-\\udfff): not UTF-8 text')
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        pass
    elif prompt is None:
        raise BatchInputError('no "prompt" (give text or a list of token ids)')
    elif isinstance(prompt, list) and prompt:
        bad = next(t for t in prompt if not _is_int(t))
        raise BatchInputError(f'"prompt" token ids must be integers, got {bad!r}')
    else:
        raise BatchInputError('"prompt" must be non-empty text or a list of token ids')
    overrides = {key: record[key] for key in SAMPLING_KEYS if record.get(key) is not None}
    try:
        params = replace(defaults, **overrides)
    except (TypeError, ValueError) as e:
        raise BatchInputError(str(e)) from None
    return prompt, params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8(value: str | int) -> bool:
    """False for strings JSON allows but UTF-8 cannot hold (lone surrogates from \\ud800 escapes)."""
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_done_ids(path: str) -> set[str | int]:
    """Ids already written to the output file. A torn last line (a write cut off by a crash) is cut
    from the file, so the next append starts on a clean line; any other bad line is an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] and not _complete_record(lines[-1]):
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
        lines.pop()
    elif lines and lines[-1]:  # a whole record missing only its newline: keep it, end the line
        with open(path, "ab") as f:
            f.write(b"\n")
    done = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _complete_record(line)
        if record is None:
            raise BatchInputError(f"{path}:{number}: not a result line; fix or remove it to resume")
        done.add(record["id"])
    return done


def _complete_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def run_batch(
    engine, items: list[BatchItem], output_path: str, *, progress: bool = True, window: int = DEFAULT_WINDOW
) -> BatchSummary:
    """Runs every item not already in output_path through `engine` (add_request / step), appending each
    result as its request finishes. KeyboardInterrupt propagates after the file is closed; results
    already written stay. If the engine raises, every request not yet done is reported failed; errors
    writing the output file propagate (they are not the requests' fault)."""
    from tqdm import tqdm

    done = read_done_ids(output_path)
    pending = [item for item in items if item.request_id not in done]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(pending))
    queue = iter(pending)
    running: dict[str, BatchItem] = {}  # engine request id -> item
    bar = tqdm(
        total=len(items),
        initial=summary.skipped,
        file=sys.stderr,
        disable=not progress,
        unit="req",
        dynamic_ncols=True,
    )
    with bar, open(output_path, "a", encoding="utf-8") as out:
        while True:
            try:
                _fill(engine, queue, running, summary, window, out)
                if not running:
                    break
                finished = engine.step()[1]
            except Exception as e:  # the engine broke: nothing it held is done; a re-run retries them
                why = f"error: engine failed: {type(e).__name__}: {e}"
                for item in [*running.values(), *queue]:
                    summary.failed[item.request_id] = why
                break
            for request in finished:
                item = running.pop(request.request_id, None)
                if item is None:
                    continue
                reason = request.finish_reason or ""
                if reason.startswith("error"):
                    summary.failed[item.request_id] = reason
                else:
                    _append(out, result_record(engine, item, request))
                    summary.written += 1
            done_now = summary.skipped + summary.written + len(summary.failed) + len(summary.refused)
            bar.update(done_now - bar.n)
            bar.set_postfix(failed=len(summary.failed) + len(summary.refused), refresh=False)
    return summary


def _fill(engine, queue: Iterable[BatchItem], running: dict, summary: BatchSummary, window: int, out) -> None:
    from mlapipe.runtime.engine import PromptError

    while len(running) < window:
        item = next(queue, None)
        if item is None:
            return
        if item.error is not None:
            _refuse(out, summary, item, item.error)
            continue
        try:
            running[engine.add_request(item.prompt, item.params)] = item
        except PromptError as e:  # this prompt can never run with these settings; the rest can
            _refuse(out, summary, item, str(e))
        except Exception as e:
            summary.failed[item.request_id] = f"error: engine failed: {type(e).__name__}: {e}"
            raise


def result_record(engine, item: BatchItem, request) -> dict[str, Any]:
    tokens = list(request.output_token_ids)
    return {
        "id": item.request_id,
        "text": engine.tokenizer.decode(tokens),
        "token_ids": tokens,
        "finish_reason": request.finish_reason,
        "prompt_tokens": len(request.prompt_token_ids),
        "completion_tokens": len(tokens),
    }


def _refuse(out, summary: BatchSummary, item: BatchItem, why: str) -> None:
    """A permanent failure: an error line, so a re-run skips the request instead of failing it again."""
    _append(out, {"id": item.request_id, "error": why, "finish_reason": "error"})
    summary.refused[item.request_id] = why


def _append(out, record: dict[str, Any]) -> None:
    # One write per line, then flush and fsync: after a crash the file ends at most in one torn line.
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())


def describe_failures(summary: BatchSummary, limit: int = 5) -> str:
    """One line: the requests that can never run (error lines written) and those a re-run retries."""
    parts = []
    for failures, what in (
        (
            summary.refused,
            "could not run and got an error line (a re-run skips them; fix the input or the "
            "settings and delete those lines from the output to retry)",
        ),
        (summary.failed, "failed and were not written; re-run the same command to retry them"),
    ):
        if failures:
            shown = "; ".join(f"{rid!r}: {why}" for rid, why in list(failures.items())[:limit])
            more = f" (and {len(failures) - limit} more)" if len(failures) > limit else ""
            parts.append(f"{len(failures)} of {summary.total} requests {what}. {shown}{more}")
    return " ".join(parts)
