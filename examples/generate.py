"""Generate text from a trained HGRN2 checkpoint, streaming tokens as they come.

    python examples/generate.py out/tiny --prompt "def fibonacci(n):"
    python examples/generate.py path/to/hgrn2-1.3B-100B --prompt "The capital of France" --top-p 0.9

The checkpoint is a directory with config.json + model.safetensors (this library's or fla's), or
a training output directory (its `latest` checkpoint is used). The tokenizer is the directory's
tokenizer.json unless --tokenizer names another. Decoding is the model's recurrent step
(`hgrn2mini.generation`): memory stays constant however many tokens are generated; on CUDA each
step is one CUDA graph replay. It prints the time to the first token and the tokens/s after it
(the per-token host sync that printing needs included), after a warm-up at the prompt's length.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hgrn2mini import HGRN2ForCausalLM
from hgrn2mini.generation import CAPTURES, warmup

EOT = "<|endoftext|>"  # this library's document separator (examples/data.py)


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory, or a training output directory whose `latest` names one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    pointer = path / "latest"
    if pointer.is_file():
        return path / pointer.read_text().strip()
    raise FileNotFoundError(
        f"checkpoint {str(path)!r} must be a directory with config.json, or a training output "
        f"directory with a 'latest' file; found neither"
    )


def find_tokenizer(checkpoint: Path, explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [checkpoint / "tokenizer.json", checkpoint.parent / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"--tokenizer: no tokenizer.json found (looked at {', '.join(map(str, candidates))}); "
        f"pass --tokenizer PATH"
    )


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from a document boundary."""
    ids = tokenizer.encode(prompt).ids  # adds BOS where the tokenizer's post-processor says so (fla's)
    if ids:
        return ids
    for special in (EOT, "<s>"):  # ours, then LLaMA-style tokenizers as fla's checkpoints use
        if (tid := tokenizer.token_to_id(special)) is not None:
            return [tid]
    raise ValueError("--prompt is empty and the tokenizer has no <|endoftext|> or <s> token to start from")


def stream(
    model: HGRN2ForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_at_eot: bool = True,
    capture: str = "auto",
    stats: dict | None = None,
) -> Iterator[str]:
    """Yields the decoded text as it grows, piece by piece (the prompt itself is not yielded).
    stats, when given, receives ttft_s (prompt to first token), tokens and decode_s (the rest)."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    if max(ids) >= model.config.vocab_size:
        raise ValueError(
            f"--tokenizer gives ids up to {max(ids)}, but the model's vocab_size is {model.config.vocab_size}: "
            f"wrong tokenizer for this checkpoint?"
        )
    eot = tokenizer.token_to_id(EOT)
    eos = eot if stop_at_eot and eot is not None else None
    new: list[int] = []
    shown = ""
    x = torch.tensor([ids], device=device)
    t0 = time.perf_counter()
    for token in model.generate(x, max_new_tokens, temperature, top_k, top_p, generator,
                                eos_token_id=eos, capture=capture):
        t = int(token[0])  # the host needs each token to print it anyway
        if stats is not None:
            now = time.perf_counter()
            stats.setdefault("ttft_s", now - t0)
            stats["tokens"] = stats.get("tokens", 0) + 1
            stats["decode_s"] = now - t0 - stats["ttft_s"]
        if eos is not None and t == eos:
            break
        new.append(t)
        text = tokenizer.decode(new)
        # A byte-level token can end inside a multi-byte character: hold it back until complete.
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(new)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("checkpoint", help="model directory (config.json + model.safetensors) or training --out-dir")
    p.add_argument("--prompt", default="", help="text to continue ('': start a new document)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (None: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="stop after this many tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (None: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (None: as stored)")
    p.add_argument("--capture", choices=CAPTURES, default="auto",
                   help="how each decode step runs: auto is compile+graph on CUDA, none on the CPU")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up at the prompt's length (then the first token's time includes compiling)")
    args = p.parse_args(argv)
    try:
        directory = resolve_checkpoint(args.checkpoint)
        tokenizer = Tokenizer.from_file(str(find_tokenizer(directory, args.tokenizer)))
    except FileNotFoundError as e:
        p.error(str(e))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = HGRN2ForCausalLM.from_pretrained(directory, device=args.device, dtype=dtype).eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if not args.no_warmup:
        t0 = time.perf_counter()
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, capture=args.capture)
        warmup(model, (1,), prompt_lengths=(len(prompt_ids(tokenizer, args.prompt)),), padded=False, **sampling)
        print(f"[warm-up {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    print(args.prompt, end="", flush=True)
    stats: dict = {}
    try:
        for piece in stream(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, generator, capture=args.capture, stats=stats):
            print(piece, end="", flush=True)
    except ValueError as e:
        p.error(str(e))
    print(flush=True)
    if stats:
        rate = (stats["tokens"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
        print(f"[time to first token {stats['ttft_s'] * 1e3:.1f} ms, {stats['tokens']} tokens, "
              f"{rate:.1f} tokens/s after it]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
