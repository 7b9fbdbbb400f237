"""The defender (and the judge's engine): a Qwen2.5-VL policy through transformers.

- ``full``: ``Qwen/Qwen2.5-VL-7B-Instruct`` (or any id / local folder of that family), loaded
  with ``from_pretrained``; ``trust_remote_code`` only when the config says so.
- ``tiny``: the same classes (``Qwen2_5_VLForConditionalGeneration``, ``Qwen2_5_VLProcessor``)
  from a small config with random weights, and a word-level tokenizer built locally from the
  synthetic world's vocabulary (shared/notes/dependencies.md §4.0-4.1). Answers ``\\boxed{A}`` ..
  ``\\boxed{F}`` are single added tokens, so a tiny model can learn to emit them.

The policy implements the MLLM interface (``generate``) and what RL needs: sampled rollouts
and per-token log-probabilities of responses under the tempered distribution, computed by one
function for both the old and the new policy (so the first on-policy ratio is exactly 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from models.decoding import decode, mrope_positions
from models.mcq import letters
from models.roles import lock_of, private_copy, serialized
from models.shared_images import distinct_rows, expand_rows, repeated_images
from models.shared_prompts import additive_mask, pack_groups
from models.text_attention import DEFAULT as DEFAULT_TEXT_ATTENTION
from models.text_attention import set_text_attention
from models.vision_attention import DEFAULT as DEFAULT_VISION_ATTENTION
from models.vision_attention import set_vision_attention

# KV cache and loop of rollouts (defender.*.decode_cache): transformers' generate with a dynamic or
# a static cache, or our own loop over a static cache (models/decoding.py)
DECODE_CACHES = ("dynamic", "static", "loop", "graph")

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
ANSWER_TOKENS = [f"\\boxed{{{x}}}" for x in letters(6)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocabulary() -> list[str]:
    """Every word of the MCQ template, the question templates and the world's vocabulary."""
    from models.mcq import PROMPT_TEMPLATE
    from world import CATEGORIES, COLOURS
    from world.questions import RELATIONS

    text = (
        PROMPT_TEMPLATE + " Where is the relative to the ? What is the colour of the ? How many are there in the "
        "image ? Is there a in the image ? yes no system user assistant"
    )
    words = set(text.replace("{", " ").replace("}", " ").replace("\\", " ").split())
    words |= set(COLOURS) | set(CATEGORIES) | {c + "s" for c in CATEGORIES} | set(RELATIONS)
    words |= {str(i) for i in range(21)} | set(letters(26))
    words |= set("()[]{}.,:;?!-\\\"'")
    out = []
    for w in sorted(words):
        out.extend(_split_punct(w))
    return sorted(set(out))


def _split_punct(word: str) -> list[str]:
    parts, cur = [], ""
    for ch in word:
        if ch.isalnum():
            cur += ch
        else:
            if cur:
                parts.append(cur)
            parts.append(ch)
            cur = ""
    if cur:
        parts.append(cur)
    return parts


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + tiny_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>", padding_side="left"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:7]})
    tok.add_tokens(ANSWER_TOKENS)  # matched before pre-tokenization, decoded verbatim
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_byte_tokenizer():
    """A byte-level BPE tokenizer (no merges: one token per byte) with Qwen's special tokens.

    For full-size random-weight architectures (benchmarks): real token ids, real lengths (one
    token per character), no hub. Its ids are all < 300, inside any Qwen vocabulary.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for t in SPECIAL:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:7]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass
class TinyDefenderSpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1  # key-value heads (grouped-query attention, as Qwen2.5-VL). With one, every head of a layer
    # attends with the same keys: a layer cannot look for the question's shape and for a colour at once.
    vision_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 64
    patch_size: int = 8
    min_pixels: int = 64 * 64
    max_pixels: int = 128 * 128
    rope_theta: float = 1e4  # language model's rotary base. The image tokens' height and width get the *lowest*
    # frequencies (mrope sections come last), so with few positions a small base is what lets them see where things are.
    window_size: int = 0  # vision window attention side in pixels; 0: 4 patches. One window per image (>= the
    # image side) is one attention call per image instead of one per window: far fewer kernel launches on a GPU.


def build_tiny_processor(tok, spec: TinyDefenderSpec):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    kw = dict(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(tok, spec: TinyDefenderSpec, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = spec.hidden // spec.heads
    half = head_dim // 2  # mrope sections (temporal, height, width) must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        rope_scaling={"mrope_section": section, "rope_type": "default", "type": "default"},
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=spec.window_size or spec.patch_size * 4,
        fullatt_block_indexes=[spec.vision_depth - 1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model


@dataclass
class Rollout:
    """A batch of sampled responses and what the loss needs of them (all on CPU until used)."""

    prompts: list[str]
    images: list[Image.Image]
    response_ids: torch.Tensor  # (B, T) right-padded
    response_mask: torch.Tensor  # (B, T) 1 for response tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    texts: list[str]


# Scoring logits up to this many elements are normalized in one piece, larger ones row by row
# (16 Mi: 64 MB in float32; the 3B benchmark's (16, 256, 151936) stay row by row).
ONE_PIECE_LOGITS = 1 << 24


class QwenVLPolicy:
    def __init__(
        self,
        model,
        processor,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        vision_attention: str = DEFAULT_VISION_ATTENTION,
        image_device: str | None = None,
        text_attention: str = DEFAULT_TEXT_ATTENTION,
    ):
        self.model = model.to(device=device, dtype=dtype)
        # "grouped": the vision tower's windows in a few batched calls (models/vision_attention.py)
        set_vision_attention(self.model, vision_attention)
        # "packed": a decoding step attends without copying the key-value heads (models/text_attention.py)
        set_text_attention(self.model, text_attention)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.device = device
        self.dtype = dtype
        # Where the image processor resizes, normalizes and patchifies (its torchvision backend's
        # ``device``): None, the CPU. An HRBench 8-megapixel image costs more CPU time there than the
        # model's prefill of it takes on a GPU (experiments/RESULTS.md); "cuda" moves that work onto the card.
        self.image_device = image_device
        # Rows repeating an image go through the processor and vision tower once (encode); off only
        # to measure what that saves (experiments/defender_dapo.py, variant "unshared").
        self.share_images = True
        # Rows repeating a prompt (a group's G completions) scored as one packed row, the prompt
        # once (models/shared_prompts.py); set by the trainer from defender.*.share_prompts.
        self.share_prompts = False
        # Vision placeholders can never be *outputs*: a sampled <|image_pad|> would desynchronize
        # image features and tokens on the next forward. Suppressed in sampling and masked in
        # log-probs alike, so the sampler and the scorer are one distribution.
        names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in names]
        self.suppressed = sorted({i for i in ids if i is not None and i != self.tokenizer.unk_token_id})

    # ------------------------------------------------------------ building
    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        spec: TinyDefenderSpec | None = None,
        device: str = "cpu",
        vision_attention: str = DEFAULT_VISION_ATTENTION,
        image_device: str | None = None,
        text_attention: str = DEFAULT_TEXT_ATTENTION,
    ) -> "QwenVLPolicy":
        spec = spec or TinyDefenderSpec()
        tok = build_tiny_tokenizer()
        return cls(
            build_tiny_model(tok, spec, seed),
            build_tiny_processor(tok, spec),
            device=device,
            vision_attention=vision_attention,
            image_device=image_device,
            text_attention=text_attention,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        vision_attention: str = DEFAULT_VISION_ATTENTION,
        image_device: str | None = None,
        text_attention: str = DEFAULT_TEXT_ATTENTION,
    ) -> "QwenVLPolicy":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
        dt = getattr(torch, dtype)
        run = dict(vision_attention=vision_attention, image_device=image_device, text_attention=text_attention)
        return cls(model, processor, device=device, dtype=dt, **run)

    def save(self, folder: str | Path) -> None:
        """Weights as safetensors, plus config, tokenizer and processor: loadable by from_pretrained."""
        self.model.save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)

    # ------------------------------------------------------------ encoding
    def chat(self, prompt: str, processor=None) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return (processor or self.processor).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, images: list[Image.Image], prompts: list[str], processor=None) -> tuple[dict, list[int]]:
        """The processor batch of the *distinct* (image, prompt) rows, expanded to every row, and
        each row's distinct image (``inverse``): a GRPO group repeats its row G times, and the
        processor and vision tower then see it once (models/shared_images.py). Images count as
        the same when they are the same object (the trainer repeats its examples' images).
        ``processor``: a private copy of ``self.processor`` (``prepare``), used without the lock."""
        keys = [(id(im), p) for im, p in zip(images, prompts)] if self.share_images else list(range(len(images)))
        first, inverse = distinct_rows(keys)
        on = {"device": self.image_device} if self.image_device else {}
        # A fast tokenizer refuses a call while another thread holds it ("Already borrowed"): one
        # batch may be encoded (prepare, in a worker) while the last one's answers are decoded.
        with lock_of(self.tokenizer) if processor is None else contextlib.nullcontext():
            batch = (processor or self.processor)(
                text=[self.chat(prompts[i], processor) for i in first],
                images=[images[i] for i in first],
                return_tensors="pt",
                padding=True,
                **on,
            )
        return {k: v.to(self.device) for k, v in expand_rows(batch, inverse).items()}, inverse

    def prepare(self, images: list[Image.Image], prompts: list[str]) -> tuple[dict, list[int]]:
        """The model inputs of one ``generate`` call (``encoded=``), made ahead: evaluation
        (evaluation/answers.ask) prepares the next batches in worker threads while this one is
        answered, so the image processor's CPU time hides behind the GPU's. Each worker encodes
        with a private copy of the processor (models.roles.private_copy): under the tokenizer's one
        lock the workers would take turns, and resizing large images is most of their time."""
        with private_copy(self.processor, guard=lock_of(self.tokenizer)) as processor:
            return self.encode(images, prompts, processor)

    # ------------------------------------------------------------ sampling
    @serialized  # seeds the global torch RNG and patches the vision tower's forward (repeated_images)
    @torch.no_grad()
    def rollout(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 16,
        seed: int = 0,
        cache: str = "dynamic",
        encoded: tuple[dict, list[int]] | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """Sample responses. ``cache="static"``: a preallocated KV cache, with which transformers
        compiles the decoding step on CUDA (CUDA graphs: far less per-token launch overhead);
        ``cache="loop"``: the same cache and compiled step in our own decoding loop, which never
        waits on the GPU between tokens (models/decoding.py); ``cache="graph"``: that loop with the
        whole step captured as one CUDA graph (CUDA only). ``encoded``: ``prepare(images,
        prompts)``, made ahead. ``seeds`` (one per row): each row samples from its own seed, as it
        would alone (models.decoding.row_uniforms; our loop, whatever ``cache`` says)."""
        if cache not in DECODE_CACHES:
            raise ValueError(f"decode cache {cache!r}: choose one of {', '.join(DECODE_CACHES)}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: {len(seeds)} for {len(prompts)} prompts (one per row)")
        row_seeds = list(seeds) if seeds is not None and temperature > 0 else None
        if row_seeds is not None and cache not in ("loop", "graph"):
            cache = "loop"
        enc, inverse = encoded if encoded is not None else self.encode(images, prompts)
        torch.manual_seed(seed)
        sample = temperature > 0
        gen_kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        self.model.eval()
        if cache == "static":
            gen_kw["cache_implementation"] = cache
        with repeated_images(self.model, inverse):
            if cache in ("loop", "graph"):
                resp = decode(
                    self.model,
                    enc,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    suppressed=self.suppressed,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    seed=seed,
                    step="graph" if cache == "graph" else None,
                    row_seeds=row_seeds,
                ).cpu()
            else:
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, suppress_tokens=self.suppressed, **gen_kw
                )
                resp = out[:, enc["input_ids"].shape[1] :].cpu()
        eos = self.tokenizer.eos_token_id
        is_eos = resp == eos
        has_eos = is_eos.any(dim=1)
        first = torch.where(
            has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, resp.shape[1], dtype=torch.long)
        )
        pos = torch.arange(resp.shape[1]).unsqueeze(0)
        mask = pos <= first.unsqueeze(1)  # up to and including the first EOS
        resp = torch.where(mask, resp, torch.full_like(resp, self.tokenizer.pad_token_id))
        with lock_of(self.tokenizer):
            texts = [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, mask)]
        return Rollout(list(prompts), list(images), resp, mask.long(), ~has_eos, texts)

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        temperature: float = 0.0,
        seed: int = 0,
        max_new_tokens: int = 16,
        encoded: tuple[dict, list[int]] | None = None,
        seeds: list[int] | None = None,
    ) -> list[str]:
        """Answers (greedy at temperature 0). ``seeds``: one per prompt, each row sampled as it
        would be alone under its seed (an evaluation's per-item trial seeds, the attacker reward's
        K queries); else the batch samples from ``seed``."""
        kw = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, encoded=encoded, seeds=seeds)
        return self.rollout(images, prompts, **kw).texts

    # --------------------------------------------------------- log-probs
    @serialized
    def response_logprobs(
        self,
        images: list[Image.Image],
        prompts: list[str],
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ):
        """Per-token log pi(response | prompt, image) under softmax(logits / temperature): (B, T).

        The one function for old (sampling) and new policy log-probs, so that with the same
        micro-batches and dtype the first on-policy ratio is exactly 1.
        """
        enc, inverse = self.encode(images, prompts)
        resp = response_ids.to(self.device)
        input_ids = torch.cat([enc["input_ids"], resp], dim=1)
        attn = torch.cat([enc["attention_mask"], response_mask.to(self.device).long()], dim=1)
        # Positions from the tokens' kinds (image or text; the response is text), as the sampler
        # places them: without the kinds transformers (5.x) cannot lay the image on mRoPE's
        # (t, h, w) grid and numbers every token 0, 1, 2, ..., padding included, so training would
        # move a distribution other than the one that answers (tests/test_defender.py checks the
        # scorer against the sampler token by token). Computed on the CPU (mrope_positions).
        kinds = torch.cat([enc["mm_token_type_ids"], enc["mm_token_type_ids"].new_zeros(resp.shape)], dim=1)
        position, _ = mrope_positions(self.model, input_ids, kinds, enc["image_grid_thw"], attn)
        # use_cache=False: a scoring forward has no next token to decode, and a KV cache would copy
        # every layer's keys and values of the whole batch into it (unless gradient checkpointing
        # happens to drop it), costing memory and time and specializing compiled layers per index.
        if self.share_prompts and len(set(inverse)) < len(inverse):
            logits = self._shared_prompt_logits(enc, inverse, input_ids, attn, kinds, position, resp.shape[1])
        else:
            with repeated_images(self.model, inverse):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attn,
                    pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                    position_ids=position,
                    mm_token_type_ids=kinds,
                    logits_to_keep=resp.shape[1] + 1,
                    use_cache=False,
                )
            logits = out.logits[:, :-1]
        # Row by row, in the model's dtype (as TRL does): a float32 (B, T, vocab) tensor would be
        # ~10 GB at batch 64 for a 150k vocabulary. A small one (the tiny defenders' vocabularies)
        # goes in one piece: the same numbers, and a few kernels instead of several per row — on a
        # GPU a tiny defender's step is its kernel launches. Entropy is a metric: without a graph.
        whole = logits.numel() <= ONE_PIECE_LOGITS
        logps, ents = [], []
        for part, ids in [(logits, resp)] if whole else zip(logits.unbind(0), resp.unbind(0)):
            part = part / max(temperature, 1e-6)
            if self.suppressed:
                part[..., self.suppressed] = float("-inf")
            part_logp = torch.log_softmax(part, dim=-1)
            logps.append(part_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float())
            if with_entropy:
                with torch.no_grad():
                    lp = torch.log_softmax(part.detach().float(), dim=-1)
                    ents.append(-(lp.exp() * lp.masked_fill(torch.isinf(lp), 0.0)).sum(-1))
        logp = logps[0] if whole else torch.stack(logps)
        if not with_entropy:
            return logp
        return logp, ents[0] if whole else torch.stack(ents)

    def _shared_prompt_logits(self, enc, inverse, input_ids, attn, kinds, position, response_len):
        """(B, T, vocab) logits predicting each row's response tokens, from one packed row per
        distinct (image, prompt): its prompt once, then its rows' completions
        (models/shared_prompts.py). The vision tower sees each distinct image once, as with shared images."""
        pk = pack_groups(
            input_ids.cpu(), attn.cpu(), kinds.cpu(), position.cpu(), response_len, inverse, self.tokenizer.pad_token_id
        )
        out = self.model(
            input_ids=pk.ids.to(self.device),
            attention_mask=additive_mask(pk.allowed, self.dtype).to(self.device),
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"][pk.prompt_rows],
            position_ids=pk.position.to(self.device),
            mm_token_type_ids=pk.kinds.to(self.device),
            logits_to_keep=pk.keep.to(self.device),
            use_cache=False,
        )
        return out.logits[pk.row_of.to(self.device)[:, None], pk.take.to(self.device)]

    @torch.no_grad()
    def answer_probability(
        self,
        images: list[Image.Image],
        prompts: list[str],
        answers: list[str],
        num_options: list[int],
        batch: int = 32,
    ) -> list[float]:
        """P(the right letter) per row: a softmax over the options of each answer written as the
        prompt asks (``\\boxed{L}``), from scoring forwards only (no sampling). A dense view of
        what K sampled answers estimate with noise, for the attacker's efficacy."""
        from world.questions import letters

        rows = [(i, letter) for i, n in enumerate(num_options) for letter in letters(n)]
        ids, mask = self.target_ids([f"\\boxed{{{letter}}}" for _, letter in rows])
        mask[torch.arange(len(rows)), mask.sum(1) - 1] = 0  # the answer, not the EOS after it
        totals = []
        for start in range(0, len(rows), batch):
            sl = slice(start, start + batch)
            idx = [i for i, _ in rows[sl]]
            logp = self.response_logprobs([images[i] for i in idx], [prompts[i] for i in idx], ids[sl], mask[sl])
            totals.append((logp * mask[sl].to(logp.device)).sum(1).float().cpu())
        total = torch.cat(totals)
        out, k = [], 0
        for n, answer in zip(num_options, answers):
            probs = torch.softmax(total[k : k + n].double(), 0)
            out.append(float(probs[letters(n).index(answer)]) if answer in letters(n) else 0.0)
            k += n
        return out

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def target_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (right-padded) and mask of answer texts followed by EOS, for supervised targets."""
        seqs = [self.tokenizer.encode(t, add_special_tokens=False) + [self.tokenizer.eos_token_id] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask


def pretrained_policy(model: str, **kw) -> QwenVLPolicy:
    """A pretrained Qwen2.5-VL by hub id or folder (the ``qwen-vl`` defender backend)."""
    return QwenVLPolicy.from_pretrained(model, **kw)


def load_policy(spec: dict | str) -> QwenVLPolicy:
    """Build a defender from a config spec: ``{"backend": "tiny"|"qwen-vl", ...}``."""
    spec = {"backend": spec} if isinstance(spec, str) else dict(spec)
    backend = spec.pop("backend")
    if backend == "tiny":
        checkpoint = spec.pop("checkpoint", None)
        if checkpoint:
            return QwenVLPolicy.from_pretrained(checkpoint, **spec)
        run = {k: spec.pop(k) for k in ("device", "vision_attention", "image_device", "text_attention") if k in spec}
        return QwenVLPolicy.tiny(seed=spec.pop("seed", 0), spec=TinyDefenderSpec(**spec), **run)
    if backend == "qwen-vl":
        return QwenVLPolicy.from_pretrained(spec.pop("model"), **spec)
    raise ValueError(f"unknown defender backend {backend!r}")
