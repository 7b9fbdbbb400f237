"""Rollout decoding in our own loop: one prefill, then one model call and a few sampling kernels
per token, with nothing in the loop that waits for the GPU.

transformers' ``generate`` with a static cache already replays the model's decoding step as a CUDA
graph, yet measured at ~11 ms per token for 16 sequences of the 3B defender on an H100, about 5x
the time to read its weights once (experiments/RESULTS.md, issue 23). What it adds per token runs
on the CPU between two graph replays: input preparation, logits processors, stopping criteria,
and a check "are all sequences finished?" that copies a flag to the host, so the CPU can never
run ahead of the GPU and every token pays both. Here the loop keeps every per-token tensor on the
device (next token, positions, cache slot, finished flags), samples with device-side kernels, and
looks at the finished flags only every ``check_every`` tokens.

Positions follow the scorer (``QwenVLPolicy.response_logprobs``, a full forward over prompt and
response): a response token at cache slot ``s`` of a row with ``p`` left pads sits at text
position ``s - p + rope_delta`` (transformers' mRoPE delta from the prefill), so the sampler and
the scorer see the same sequence. Finished rows are fed the pad token, as ``generate`` does; their
tokens after EOS are never scored (the rollout masks them).
"""

from __future__ import annotations

import inspect
import warnings

import torch

CHECK_EVERY = 16  # tokens between looks at the finished flags (each look waits for the GPU)
# The cache's length is rounded up to a multiple of this: a compiled step is recorded per shape,
# and prompts of every length would otherwise each record their own (slots past the response
# are never written, and the mask keeps them out of attention).
CACHE_BUCKET = 128


def _base(model):
    """The transformers model under a peft wrapper (LoRA layers live inside its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.24; the GPU image runs 5.17)."""
    return "cache" if "cache" in inspect.signature(type(_base(model)).forward).parameters else "past_key_values"


def mrope_positions(model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
    """(position ids (3, B, L), deltas (B, 1)) of mRoPE for a left-padded batch, on the ids' device:
    each image on its (t, h, w) grid, text after it continuing past the grid; text position =
    index among the row's real tokens + delta. transformers' own ``get_rope_index``, run on CPU
    copies: on a GPU tensor it waits on the device several times per row (masking, ``tolist``,
    reading the grid), hundreds of waits for a batch of rollouts, where a copy waits once."""
    base = _base(model)
    owner = next((m for m in base.modules() if hasattr(m, "get_rope_index") and hasattr(m, "rope_deltas")), None)
    if owner is None:
        raise TypeError(f"{type(base).__name__}: no get_rope_index (a Qwen2.5-VL model is expected)")
    position, deltas = owner.get_rope_index(
        input_ids.cpu(),
        mm_token_type_ids=mm_token_type_ids.cpu(),
        image_grid_thw=image_grid_thw.cpu(),
        attention_mask=attention_mask.cpu(),
    )
    return position.to(input_ids.device), deltas.to(input_ids.device).view(-1, 1)


def next_tokens(logits: torch.Tensor, temperature: float, suppressed: torch.Tensor, generator) -> torch.Tensor:
    """One token per row from the last position's logits: argmax at temperature 0, else a sample of
    softmax(logits / temperature) (float32), the ``suppressed`` ids (a device tensor: a Python list
    would be copied to the GPU every token) never drawn. ``generator``: a torch.Generator that the
    batch draws from, or a (B,) tensor of each row's own uniform in [0, 1) (``row_uniforms``)."""
    logits = logits.float()
    if suppressed.numel():
        logits.index_fill_(1, suppressed, float("-inf"))
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if isinstance(generator, torch.Tensor):
        return inverse_cdf(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose slice of the cumulative distribution holds ``uniform`` (scaled by
    the row's total mass, so rounding cannot run past the end). float64 sums: the last slices of
    a 150k vocabulary are thinner than float32's steps near 1. Never a token of probability 0."""
    cdf = probs.double().cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    last = probs.shape[1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)  # the last token with mass
    return torch.minimum(pick, last)


def row_uniforms(row_seeds: list[int], steps: int, device) -> torch.Tensor:
    """(steps, B): row b's uniforms, from its own generator seeded ``row_seeds[b]``. A row then
    samples what it would sample alone under that seed, whatever rows share its batch (up to the
    float rounding of batched forwards): the attacker's reward asks about many images per call,
    yet each image's sampled answers must not depend on which images sit beside it."""
    draws = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in row_seeds]
    return torch.stack(draws, dim=1).to(device)


STEPS = ("eager", "compiled", "graph")


@torch.no_grad()
def decode(
    model,
    enc: dict,
    *,
    max_new_tokens: int,
    temperature: float,
    suppressed: list[int],
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    step: str | None = None,
    check_every: int = CHECK_EVERY,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Response ids (B, <= max_new_tokens), pad after a row's EOS; stops early once every row has
    ended. ``enc``: the processor's batch (left-padded prompts, on the model's device).
    ``step``: how a decoding step runs — "eager"; "compiled", transformers' compiled call (CUDA
    graphs by torch.compile); "graph", the whole step (model and cache update) captured by us as
    one CUDA graph after the first step, replayed with one launch per token. Default: "compiled"
    on CUDA, else "eager". ``row_seeds``: each row samples from its own seed (``row_uniforms``),
    not the batch from ``seed``."""
    from transformers import StaticCache

    base = _base(model)
    ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    (B, L), T, device = ids.shape, max_new_tokens, ids.device
    step = step or ("compiled" if device.type == "cuda" else "eager")
    if step not in STEPS or (step == "graph" and device.type != "cuda"):
        raise ValueError(f"decoding step {step!r}: choose one of {', '.join(STEPS)} ('graph' on CUDA only)")
    if row_seeds is not None and len(row_seeds) != B:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for a batch of {B} rows")
    own = row_uniforms(row_seeds, T, device) if row_seeds is not None and temperature > 0 else None
    generator = torch.Generator(device=device).manual_seed(seed)
    banned = torch.tensor(suppressed, dtype=torch.long, device=device)
    length = -(-(L + T) // CACHE_BUCKET) * CACHE_BUCKET
    cache = StaticCache(config=base.config, max_cache_len=length)
    key = _cache_keyword(model)
    prefill, deltas = mrope_positions(model, ids, enc["mm_token_type_ids"], enc["image_grid_thw"], prompt_mask)
    out = model(
        **enc,
        position_ids=prefill,
        use_cache=True,
        cache_position=torch.arange(L, device=device),
        logits_to_keep=1,
        **{key: cache},
    )
    # The step reads and advances only these buffers, in place, so that a captured graph replays
    # it: the token fed, its text position (slot - pads + delta), its cache slot, and which slots
    # each row attends to (its prompt's real tokens and every slot written so far). A prepared
    # mask (a dict, as generate passes) also spares transformers building one every token.
    fed = torch.zeros(B, 1, dtype=torch.long, device=device)
    slot = torch.full((1,), L, dtype=torch.long, device=device)
    offset = deltas - (L - prompt_mask.sum(1, keepdim=True))
    position = (offset + L).view(1, B, 1).expand(3, B, 1).contiguous()
    attend = torch.zeros(B, 1, 1, length, dtype=torch.bool, device=device)
    attend[:, 0, 0, :L] = prompt_mask.bool()
    call = base.get_compiled_call(_compile_config()) if step == "compiled" else base.__call__

    def advance() -> torch.Tensor:
        attend.index_fill_(3, slot, True)
        logits = call(
            input_ids=fed,
            attention_mask={"full_attention": attend},
            position_ids=position,
            cache_position=slot,
            use_cache=True,
            **{key: cache},
        ).logits[:, -1]
        position.add_(1)
        slot.add_(1)
        return logits

    tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tok = next_tokens(out.logits[:, -1], temperature, banned, generator if own is None else own[0])
    graph, n = None, T
    for t in range(T):
        tok = torch.where(done, pad_token_id, tok)
        tokens[:, t] = tok
        done |= tok == eos_token_id
        if t == T - 1:
            break
        if (t + 1) % check_every == 0 and bool(done.all()):
            n = t + 1
            break
        fed.copy_(tok.view(B, 1))
        if step == "graph" and t >= 1:  # the first step ran eagerly: kernels loaded, workspaces made
            if graph is None:
                graph, logits = _capture(advance)
            if graph is False:
                logits = advance()
            else:
                graph.replay()
        else:
            logits = advance()
        tok = next_tokens(logits, temperature, banned, generator if own is None else own[t + 1])
    return tokens[:, :n]


def _capture(advance):
    """(graph, its logits buffer): ``advance`` recorded as one CUDA graph (on torch's capture stream).
    Recording runs nothing, so the buffers and the cache stay where the last real step left them;
    a step that cannot be captured (something in it waits on the GPU) gives (False, None), said
    once, and the call goes on stepping eagerly."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            logits = advance()
    except RuntimeError as e:
        # said once per message: Python's default warning filter keeps the first of each
        warnings.warn(f"decode: the step could not be captured as a CUDA graph ({e}); stepping eagerly", RuntimeWarning)
        return False, None
    return graph, logits


def _compile_config():
    """transformers' own settings for a compiled decoding step (CUDA graphs, static shapes)."""
    from transformers import CompileConfig

    return CompileConfig()
