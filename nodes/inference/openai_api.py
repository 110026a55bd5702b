"""OpenAI request validation and response shapes, with the token-level extensions RL needs.

Field names follow the peers so one client drives sglang, vLLM and this engine:

| where | field | meaning | peer |
| --- | --- | --- | --- |
| choice | ``token_ids`` | completion token ids (always returned) | sglang + vLLM (``return_token_ids``) |
| choice | ``prompt_token_ids`` | prompt token ids as the model saw them | sglang + vLLM (completions) |
| chat response | ``prompt_token_ids`` | same, at response level (single prompt) | vLLM chat |
| choice | ``matched_stop`` | stop string / token id that ended it (eos id included) | sglang |
| choice | ``stop_reason`` | stop string / stop token id, None for eos or length | vLLM |
| response | ``metadata.weight_version`` | weight version of choice 0 | sglang |
| choice | ``weight_version`` | version that produced the choice's last token | NexRL |
| choice | ``token_logprobs`` | logprob of each completion token (see sampling.py) | NexRL |
| choice | ``token_weight_versions`` | weight version of each completion token | NexRL |

``finish_reason`` is "stop" (eos, stop string, stop token), "length" or "abort" (sglang's
value for requests aborted by ``/pause_generation`` or shutdown). Standard ``logprobs`` are
returned when asked (completions: ``logprobs=k``; chat: ``logprobs=true, top_logprobs=k``).

Validation is strict: a field of the wrong type, an unknown field, or a field this engine
does not implement set to a non-neutral value (e.g. ``frequency_penalty=0.5``) is an HTTP 400
naming the field -- never silently ignored. ``stream=true`` is not supported (400).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .sampling import MAX_TOP_LOGPROBS, SamplingParams


class ApiError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


# Fields accepted for compatibility whose only supported value is the neutral one.
_NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
    "repetition_penalty": (1, 1.0, None), "min_p": (0, 0.0, None), "min_tokens": (0, None),
    "echo": (False, None), "logit_bias": (None,), "stream": (False, None),
    "stream_options": (None,), "suffix": (None,), "tools": (None,), "response_format": (None,),
    "continue_final_message": (False, None), "return_hidden_states": (False, None),
    "lora_path": (None,),
}
# Fields accepted and ignored: they carry no generation semantics here.
_INFORMATIONAL = {"model", "user", "rid", "request_id", "metadata", "store", "service_tier",
                  "return_token_ids", "return_prompt_token_ids", "return_meta_info",
                  "tool_choice", "parallel_tool_calls", "separate_reasoning",
                  "stream_reasoning", "priority"}
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
             "seed", "ignore_eos", "skip_special_tokens", "no_stop_trim", "best_of"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs"}
CHAT_FIELDS = _SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                           "chat_template_kwargs"}


@dataclass
class Parsed:
    """A validated generation request."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    logprobs: int | None  # completions: alternatives per token; chat: top_logprobs or None
    skip_special_tokens: bool
    no_stop_trim: bool
    model: str
    request_id: str


def _type_error(name: str, want: str, got: Any) -> ApiError:
    return ApiError(f"'{name}' must be {want}, got {type(got).__name__} {got!r:.80}", name)


def _get(body: dict, name: str, kind: type | tuple, default: Any, want: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in
                                          (kind if isinstance(kind, tuple) else (kind,)))
    if not ok:
        raise _type_error(name, want, value)
    return value


def _is_neutral(value: Any, allowed: tuple) -> bool:
    if None in allowed and isinstance(value, (dict, list)) and not value:
        return True  # {} / [] mean "none" as much as null does
    for v in allowed:
        if v is None or isinstance(v, bool):
            if value is v:
                return True
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == v:
            return True
    return False


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in _NEUTRAL:
            if not _is_neutral(value, _NEUTRAL[name]):
                raise ApiError(f"'{name}'={value!r:.80} is not supported by the NexRL "
                               f"embedded engine (only {_NEUTRAL[name][0]!r})", name)
        elif name not in allowed and name not in _INFORMATIONAL:
            raise ApiError(f"unknown field '{name}'", name)


def _sampling(body: dict, max_tokens: int | None, top_logprobs: int) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _type_error("stop", "a string or a list of strings", stop)
    stop_ids = _get(body, "stop_token_ids", list, [], "a list of integers")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise _type_error("stop_token_ids", "a list of integers", stop_ids)
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16,
        temperature=float(_get(body, "temperature", (int, float), 1.0, "a number")),
        top_p=float(_get(body, "top_p", (int, float), 1.0, "a number")),
        top_k=_get(body, "top_k", int, 0, "an integer"),
        stop=stop, stop_token_ids=tuple(stop_ids),
        ignore_eos=_get(body, "ignore_eos", bool, False, "a boolean"),
        seed=_get(body, "seed", int, None, "an integer"),
        top_logprobs=top_logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise ApiError(str(exc), str(exc).split(" ", 1)[0]) from exc
    return params


def _common(body: dict, prompts: list[list[int]], max_tokens: int | None,
            max_model_len: int, logprobs: int | None, top: int) -> Parsed:
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(f"'max_tokens' must be a positive integer, got {max_tokens}",
                       "max_tokens")
    longest = max(len(p) for p in prompts)
    if longest >= max_model_len:
        raise ApiError(f"prompt has {longest} tokens; this model's maximum context length is "
                       f"{max_model_len} tokens", "prompt")
    n = _get(body, "n", int, 1, "an integer")
    if not 1 <= n <= 256:
        raise ApiError(f"'n' must be in [1, 256], got {n}", "n")
    best_of = _get(body, "best_of", int, n, "an integer")
    if best_of != n:
        raise ApiError(f"'best_of'={best_of} other than n is not supported", "best_of")
    rid = body.get("rid") or body.get("request_id")
    return Parsed(prompts=prompts, params=_sampling(body, max_tokens, top), n=n,
                  logprobs=logprobs,
                  skip_special_tokens=_get(body, "skip_special_tokens", bool, True, "a boolean"),
                  no_stop_trim=_get(body, "no_stop_trim", bool, False, "a boolean"),
                  model=str(body.get("model") or ""),
                  request_id=str(rid) if isinstance(rid, str) else uuid.uuid4().hex)


def parse_completion(body: dict, tokenizer, max_model_len: int) -> Parsed:
    """Validate a /v1/completions body; text prompts are tokenized without special tokens."""
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise _type_error("prompt", "a non-empty string, list of strings, list of token ids "
                          "or list of token-id lists", prompt)
    ids = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p
           for p in prompts]
    if any(not p for p in ids):
        raise ApiError("prompt is empty", "prompt")
    logprobs = _get(body, "logprobs", int, None, "an integer or null")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    max_tokens = _get(body, "max_tokens", int, 16, "an integer")
    return _common(body, ids, max_tokens, max_model_len, logprobs, logprobs or 0)


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _type_error(f"messages[{i}].content", "a string or a list of text parts", content)


def parse_chat(body: dict, tokenizer, max_model_len: int) -> Parsed:
    """Validate a /v1/chat/completions body and render it with the model's chat template."""
    from jinja2 import TemplateError

    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of messages", messages)
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _type_error(f"messages[{i}]", "an object with a string 'role'", m)
        rendered.append({**m, "content": _message_text(i, m.get("content", ""))})
    kwargs = _get(body, "chat_template_kwargs", dict, {}, "an object")
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True,
                                             tokenize=False, **kwargs)
    except (TemplateError, ValueError, TypeError) as exc:
        raise ApiError(f"chat template failed: {exc}", "messages") from exc
    prompt = tokenizer.encode(text, add_special_tokens=False)
    want = _get(body, "logprobs", bool, False, "a boolean")
    top = _get(body, "top_logprobs", int, 0, "an integer")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    max_tokens = _get(body, "max_completion_tokens", int, None, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, None, "an integer")
    if max_tokens is None:  # chat default: as much as the context allows
        max_tokens = max(1, max_model_len - len(prompt))
    return _common(body, [prompt], max_tokens, max_model_len, top if want else None,
                   top if want else 0)


# ----------------------------------------------------------------------------- responses
def _text(seq, tokenizer, parsed: Parsed) -> str:
    text = tokenizer.decode(seq.output_ids, skip_special_tokens=parsed.skip_special_tokens)
    if isinstance(seq.matched_stop, str) and not parsed.no_stop_trim:
        cut = text.find(seq.matched_stop)
        if cut >= 0:
            text = text[:cut]
    return text


def _extensions(seq, prompt: list[int], engine_version: str) -> dict:
    stop_reason = seq.matched_stop
    if seq.finish_reason != "stop" or (isinstance(stop_reason, int)
                                       and stop_reason not in seq.params.stop_token_ids):
        stop_reason = None
    return {"matched_stop": seq.matched_stop, "stop_reason": stop_reason,
            "token_ids": list(seq.output_ids), "prompt_token_ids": list(prompt),
            "token_logprobs": list(seq.logprobs),
            "weight_version": seq.versions[-1] if seq.versions else engine_version,
            "token_weight_versions": list(seq.versions)}


def _token_strings(ids: list[int], tokenizer) -> list[str]:
    return tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False)


def _completion_logprobs(seq, tokenizer, k: int) -> dict:
    tokens = _token_strings(seq.output_ids, tokenizer)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None
    if k:
        top = []
        for alts in seq.top_logprobs:  # distinct ids can decode alike ("\ufffd"): keep the best
            entry: dict[str, float] = {}
            for text, (_, lp) in zip(_token_strings([i for i, _ in alts], tokenizer), alts):
                entry.setdefault(text, lp)
            top.append(entry)
    return {"tokens": tokens, "token_logprobs": list(seq.logprobs), "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(seq, tokenizer, k: int) -> dict:
    tokens = _token_strings(seq.output_ids, tokenizer)
    content = []
    for j, (tok, lp) in enumerate(zip(tokens, seq.logprobs)):
        alts = []
        if k:
            ids = [i for i, _ in seq.top_logprobs[j]]
            alts = [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                    for s, (_, v) in zip(_token_strings(ids, tokenizer), seq.top_logprobs[j])]
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                        "top_logprobs": alts})
    return {"content": content}


def _usage(parsed: Parsed, seqs: list) -> dict:
    prompt_tokens = sum(len(p) for p in parsed.prompts)
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_response(parsed: Parsed, seqs: list, tokenizer, model: str,
                        engine_version: str) -> dict:
    """OpenAI text_completion body; ``seqs`` are ordered prompt-major (i * n + j)."""
    choices = []
    for idx, seq in enumerate(seqs):
        prompt = parsed.prompts[idx // parsed.n]
        choice = {"index": idx, "text": _text(seq, tokenizer, parsed),
                  "logprobs": (_completion_logprobs(seq, tokenizer, parsed.logprobs)
                               if parsed.logprobs is not None else None),
                  "finish_reason": seq.finish_reason}
        choice.update(_extensions(seq, prompt, engine_version))
        choices.append(choice)
    return {"id": f"cmpl-{parsed.request_id}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(parsed, seqs),
            "metadata": {"weight_version": choices[0]["weight_version"]}}


def chat_response(parsed: Parsed, seqs: list, tokenizer, model: str,
                  engine_version: str) -> dict:
    """OpenAI chat.completion body (one prompt, n choices)."""
    prompt = parsed.prompts[0]
    choices = []
    for idx, seq in enumerate(seqs):
        choice = {"index": idx,
                  "message": {"role": "assistant", "content": _text(seq, tokenizer, parsed)},
                  "logprobs": (_chat_logprobs(seq, tokenizer, parsed.logprobs)
                               if parsed.logprobs is not None else None),
                  "finish_reason": seq.finish_reason}
        choice.update(_extensions(seq, prompt, engine_version))
        choices.append(choice)
    return {"id": f"chatcmpl-{parsed.request_id}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(parsed, seqs), "prompt_token_ids": list(prompt),
            "metadata": {"weight_version": choices[0]["weight_version"]}}
